"""Two gloo processes: identical multipliers and parameters on every rank, equal to one process with the
same global batch, and a resumed 2-process run equal to an uninterrupted one."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from run_kit import ROOT
from torch.utils.data import DataLoader, DistributedSampler

from ace.config import load_config
from ace.experiment import build_task, prepare_run, run
from ace.train import Trainer

CONFIG = ROOT / "configs" / "toy_relaxed.yaml"
SMALL = [
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=32",
    "train.batch_size=32",
    "log.every=1",
    "log.progress=false",
    "train.threads=1",
]
STEPS = 6


def trained_state(trainer):
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "multipliers": {k: v.detach().clone() for k, v in trainer.multipliers().items()},
    }


def fixed_order_trainer(shard: bool):
    """The toy ACE trainer on loaders without shuffling: one global batch of 32 per step."""
    cfg = load_config(CONFIG, SMALL)
    trainer, _ = prepare_run(cfg, None)
    dataset = build_task(cfg).train
    if shard:  # rank r reads samples r, r+2, ...: the two halves of the single-process batch
        loader = DataLoader(dataset, batch_size=16, sampler=DistributedSampler(dataset, shuffle=False))
    else:
        loader = DataLoader(dataset, batch_size=32, shuffle=False)
    return trainer, loader


def worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        trainer, loader = fixed_order_trainer(shard=True)
        trainer.fit(loader, max_steps=STEPS, print_summary=False)
        torch.save(trained_state(trainer), f"{tmp}/fixed{rank}.pt")
        # a model with a parameter no loss reaches (as the EGNN's last feature update): DDP must not fail
        model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
        model.unused = torch.nn.Linear(2, 2)
        data = torch.utils.data.TensorDataset(torch.randn(32, 2), torch.randn(32, 2))
        loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
        trainer = Trainer(
            model, torch.nn.functional.mse_loss, torch.optim.Adam(model.parameters()), progress=False
        )
        trainer.fit(loader, max_steps=3, print_summary=False)
        torch.save(trained_state(trainer), f"{tmp}/unused{rank}.pt")
        # a deviation constraint: each rank measures D on its own shard; the all-reduce makes them agree
        trainer, loaders = prepare_run(
            load_config(CONFIG.with_name("toy.yaml"), [*SMALL, "method=ace"]), None
        )
        trainer.fit(loaders["train"], max_steps=STEPS, print_summary=False)
        torch.save(trained_state(trainer), f"{tmp}/deviation{rank}.pt")
        dist.barrier()
        # through the experiment path (DistributedSampler shuffled per epoch, rank 0 writes the run)
        for name, steps, resume in (("whole", 8, False), ("parts", 4, False), ("parts", 8, True)):
            cfg = load_config(CONFIG, [*SMALL, f"train.max_steps={steps}"])
            run(cfg, f"{tmp}/{name}", resume=resume)
        torch.save(
            torch.load(f"{tmp}/parts/checkpoints/last.pt", weights_only=True)["model"],
            f"{tmp}/parts{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, str(tmp)), nprocs=2, join=True)
    return tmp


def test_ranks_hold_identical_parameters_and_multipliers(two_process_run):
    a, b = (torch.load(two_process_run / f"fixed{r}.pt", weights_only=True) for r in (0, 1))
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    for key in a["multipliers"]:
        assert torch.equal(a["multipliers"][key], b["multipliers"][key])
        assert a["multipliers"][key].abs().sum() > 0  # the duals really moved


def test_a_model_with_unused_parameters_trains(two_process_run):
    a, b = (torch.load(two_process_run / f"unused{r}.pt", weights_only=True) for r in (0, 1))
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key


def test_deviation_multipliers_agree_across_ranks(two_process_run):
    a, b = (torch.load(two_process_run / f"deviation{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a["multipliers"]["deviation"], b["multipliers"]["deviation"])
    assert a["multipliers"]["deviation"].item() > 0
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key


def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run):
    trainer, loader = fixed_order_trainer(shard=False)
    trainer.fit(loader, max_steps=STEPS, print_summary=False)
    single = trained_state(trainer)
    ddp = torch.load(two_process_run / "fixed0.pt", weights_only=True)
    for key in single["params"]:
        torch.testing.assert_close(ddp["params"][key], single["params"][key], rtol=1e-5, atol=1e-6)
    for key in single["multipliers"]:
        torch.testing.assert_close(ddp["multipliers"][key], single["multipliers"][key], rtol=1e-5, atol=1e-6)


def test_two_process_resume_equals_uninterrupted(two_process_run):
    whole = torch.load(two_process_run / "whole" / "checkpoints" / "last.pt", weights_only=True)
    assert whole["step"] == 8
    for rank in (0, 1):
        parts = torch.load(two_process_run / f"parts{rank}.pt", weights_only=True)
        for key in whole["model"]:
            assert torch.equal(whole["model"][key], parts[key]), key
    records = (two_process_run / "whole" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in records) == 8  # one writer: rank 0
