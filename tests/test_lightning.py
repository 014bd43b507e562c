"""ace.lightning: a LightningModule trained under ace constraints by a real lightning.Trainer on the CPU."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import ace  # noqa: E402
import ace.lightning  # noqa: E402
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target  # noqa: E402

SYMMETRY = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


class Toy(pl.LightningModule):
    """A user's module: a relaxed SO(2)-equivariant network, MSE loss, Adam on weights and SGD on gates."""

    def __init__(self):
        super().__init__()
        self.net = ace.relax(
            RadialVectorNet(hidden=16, layers=2),
            where=lambda n, m: isinstance(m, RadialVectorLayer),
            example=torch.randn(4, 2),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        weights = [p for n, p in self.named_parameters() if not n.endswith("gate")]
        return [torch.optim.Adam(weights, lr=3e-3), torch.optim.SGD(list(ace.gates(self).values()), lr=0.05)]


def loader():
    torch.manual_seed(0)
    x = torch.randn(128, 2)
    return DataLoader(TensorDataset(x, target(x)), batch_size=32)


def constrained():
    torch.manual_seed(1)
    return ace.lightning.Constrained(
        Toy(),
        [ace.GateConstraint(equality=True), ace.DeviationConstraint(tolerance=0.05, samples=2)],
        symmetry=SYMMETRY,
        dual=ace.DualSettings(formulation="augmented", update="alternating", lr=0.1),
        log_every=1,
    )


def trainer(tmp_path, epochs, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
        **kw,
    )


def test_fit_logs_multipliers_and_closes_the_gates(tmp_path):
    model = constrained()
    t = trainer(tmp_path, epochs=15)
    t.fit(model, loader())
    assert model.core.step_count == 60 and t.global_step == 120  # two optimisers: two Lightning steps a batch
    csv = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"  # what the logger received
    logged = set(csv.read_text().splitlines()[0].split(","))
    assert {
        "constraint/gate.net.layers.0/multiplier",
        "constraint/deviation/multiplier",
        "gate/net.layers.1",
    } <= logged
    assert all(abs(g.item()) < 0.1 for g in ace.gates(model).values())  # from 1.0
    assert model.core.multipliers()["gate"].abs().max() > 0


def test_resumed_fit_equals_uninterrupted(tmp_path):
    a = constrained()
    trainer(tmp_path / "a", epochs=4).fit(a, loader())

    b = constrained()
    first = trainer(tmp_path / "b", epochs=2)
    first.fit(b, loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    c = constrained()  # a fresh process: the same initial weights, overwritten by the checkpoint
    trainer(tmp_path / "c", epochs=4).fit(c, loader(), ckpt_path=tmp_path / "half.ckpt")

    assert c.core.step_count == a.core.step_count == 16
    for (name, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(p, q), name
    for name, m in a.core.multipliers().items():
        assert torch.equal(m, c.core.multipliers()[name]), name
