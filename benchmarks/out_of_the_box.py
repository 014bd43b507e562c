"""ACE out of the box: the natural call, every other argument at its default, at any loss scale.

    python benchmarks/out_of_the_box.py            # the whole table (about 10 min on 2 cores)
    python benchmarks/out_of_the_box.py --quick    # one seed, fewer steps
    python benchmarks/out_of_the_box.py --nbody 600  # and resilient N-body, symmetric vs field, scales 1, 100

Three users, none of whom tunes a gain:

* ``toy``: the README's own-loop network (``RadialVectorNet``, 2 relaxed layers, exactly symmetric data) with
  ``ace.PrimalDual(model, Adam(model.parameters(), 3e-3), [GateConstraint(equality=True)], symmetry=...)``,
  its mse multiplied by ``a`` in 1e-2 .. 1e4, 640 steps of batch 64, 2 seeds;
* ``toy/Trainer``: the same through ``ace.Trainer`` (scales 1 and 1e4);
* ``e3nn``: an O(3)-invariant polynomial written as e3nn's tetris example writes it (two
  ``FullyConnectedTensorProduct``\\ s on torch_geometric batches; :mod:`benchmarks.polynomial`), trained with
  a *summed* squared error on the 8 tetris shapes under random rotations, relaxed with ``ace.relax``, 1,000
  steps, 3 seeds.

Each row: the largest final ``|gamma|``, the largest ``|gamma|`` after the first 50 steps, and f_eq's training
loss at the end (divided by ``a``); the e3nn polynomial trained alone (no gates) is the reference for its fit.
The bar: final max ``|gamma|`` <= 1e-2, never above 1.5, f_eq fitting.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ace  # noqa: E402
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target  # noqa: E402

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def toy(seed: int, scale: float, steps: int, trainer: bool = False) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    x = torch.randn(1024, 2)
    loader = DataLoader(TensorDataset(x, target(x)), batch_size=64, shuffle=True)
    model = ace.relax(
        RadialVectorNet(hidden=64, layers=2),
        where=lambda n, m: isinstance(m, RadialVectorLayer),
        example=x[:4],
    )
    loss_fn = lambda out, y: scale * nn.functional.mse_loss(out, y)  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    constraint = ace.GateConstraint(tolerance=0.0, equality=True)
    largest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ace steps the gates itself": said once, known here
        if trainer:
            t = ace.Trainer(model, loss_fn, optimizer, symmetry=SO2, constraints=[constraint], log_every=1)
            t.fit(loader, epochs=-(-steps // len(loader)), max_steps=steps)
            largest = max(
                abs(v)
                for r in t.history[50:]
                for k, v in r.items()
                if k.startswith("gate/") and "/" not in k[5:]
            )
        else:
            core = ace.PrimalDual(model, optimizer, [constraint], symmetry=SO2)
            while core.step_count < steps:
                for xb, yb in loader:
                    with core.cached():
                        out = model(xb)
                        result = core.step(loss_fn(out, yb), inputs=xb, output=out)
                    if result.step > 50:
                        largest = max(largest, max(abs(g.item()) for g in result.gates.values()))
                    if core.step_count == steps:
                        break
    final = max(abs(g.item()) for g in ace.gates(model).values())
    with torch.no_grad(), ace.equivariant(model):
        fit = nn.functional.mse_loss(model(x), target(x)).item()
    return final, largest, fit


def e3nn(seed: int, steps: int, relaxed: bool = True) -> tuple[float, float, float]:
    """The polynomial relaxed under ACE (or, ``relaxed=False``, alone: the strict reference)."""
    from polynomial import Polynomial, tetris

    torch.manual_seed(seed)
    model = Polynomial()
    data = tetris()
    if relaxed:
        ace.relax(model, where=["tp1", "tp2"], example=data)
    symmetry = ace.Symmetry(ace.groups.O3(), inputs={"pos": "vector"}, output="0o + 6x0e")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = ace.PrimalDual(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            [ace.GateConstraint(tolerance=0.0, equality=True)] if relaxed else [],
            symmetry=symmetry,
        )
    largest = 0.0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = tetris(rotate=generator)
        with core.cached():
            out = model(batch)
            result = core.step((out - batch.y).pow(2).sum(), inputs=batch, output=out)  # summed, as e3nn's
        if result.step > 50 and relaxed:
            largest = max(largest, max(abs(g.item()) for g in result.gates.values()))
    final = max((abs(g.item()) for g in ace.gates(model).values()), default=0.0)
    with torch.no_grad(), ace.equivariant(model):
        batch = tetris(rotate=generator)
        fit = (model(batch) - batch.y).pow(2).sum().item()
    return final, largest, fit


def nbody_resilient(field: float, scale: float, steps: int, seed: int = 0) -> tuple[float, float]:
    """Resilient ACE on N-body (``configs/nbody.yaml method=ace_resilient`` at ace's defaults, its mse times
    ``scale``, ``data.field_strength=field``): the largest final slack and layer relative deviation (val)."""
    from ace.config import load_config
    from ace.experiment import prepare_run

    overrides = [
        "method=ace_resilient",
        f"data.field_strength={field}",
        f"seed={seed}",
        "log.progress=false",
        "train.eval_samples=1",
    ]
    overrides += [f"train.max_steps={steps}", "train.epochs=1000"]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "nbody.yaml", overrides)
    trainer, loaders = prepare_run(cfg, None)
    loss = trainer.loss_fn
    trainer.loss_fn = lambda out, y: scale * loss(out, y)
    summary = trainer.fit(
        loaders["train"], loaders["val"], max_steps=steps, eval_every=10**6, print_summary=False
    )
    layers = summary["layers"].values()
    return max(r["slack"] for r in layers), max(r["relative_deviation"] for r in layers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 160 toy and 300 e3nn steps")
    parser.add_argument(
        "--nbody", type=int, default=0, metavar="STEPS", help="also resilient N-body, symmetric vs field"
    )
    args = parser.parse_args()
    seeds, toy_steps, e3nn_steps = ([0], 160, 300) if args.quick else ([0, 1], 640, 1000)
    torch.set_num_threads(1)
    rows = []
    for scale in (1e-2, 1.0, 1e2, 1e4):
        for seed in seeds:
            rows.append(("toy", f"{scale:g}", seed, toy_steps, *toy(seed, scale, toy_steps)))
    for scale in (1.0, 1e4):
        for seed in seeds:
            rows.append(
                ("toy/Trainer", f"{scale:g}", seed, toy_steps, *toy(seed, scale, toy_steps, trainer=True))
            )
    for seed in [*seeds, 2] if not args.quick else seeds:
        rows.append(("e3nn (summed)", "1", seed, e3nn_steps, *e3nn(seed, e3nn_steps)))
        rows.append(
            ("e3nn strict (reference)", "1", seed, e3nn_steps, *e3nn(seed, e3nn_steps, relaxed=False))
        )
    print(
        "| model | loss scale | seed | steps | final max abs(gamma) | max abs(gamma) after step 50 "
        "| f_eq loss / scale |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, scale, seed, steps, final, largest, fit in rows:
        print(f"| {name} | {scale} | {seed} | {steps} | {final:.1e} | {largest:.2g} | {fit:.3g} |")
    closed = all(r[4] <= 1e-2 and r[5] <= 1.5 for r in rows)
    print(f"\nevery run closed its gates (final <= 1e-2, never above 1.5): {closed}")
    if args.nbody:
        print(f"\nresilient ACE on N-body, {args.nbody} steps, rho at its default:\n")
        print("| data | loss scale | max slack | max layer relative deviation |\n|---|---|---|---|")
        for field in (0.0, 0.3):
            for scale in (1.0, 100.0):
                slack, deviation = nbody_resilient(field, scale, args.nbody)
                data = "symmetric" if field == 0 else f"field E = {field}"
                print(f"| {data} | {scale:g} | {slack:.3g} | {deviation:.3g} |", flush=True)


if __name__ == "__main__":
    main()
