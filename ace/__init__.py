"""ace: train any PyTorch model under equivariance constraints by constrained optimisation.

model = ace.relax(model, where=...)                       # optional gates f_eq + gamma * f_neq
trainer = ace.Trainer(model, loss, optimizer, symmetry=ace.Symmetry(...),
                      constraints=[ace.GateConstraint(equality=True)])
trainer.fit(train_loader, val_loader, epochs=10)
exact = ace.strip(model)                                  # the exactly equivariant f_eq

ace.PrimalDual is the constrained step on its own (your loop; ace.lightning.Constrained for Lightning);
ace.diagnostics measures how symmetric data and layers are; ace.gconv and ace.sign hold equivariant layers.
"""

from ace.constrained import (
    DeviationConstraint,
    DualSettings,
    GateConstraint,
    PrimalDual,
    StepResult,
    schedules,
)
from ace.nn import GatedLayer, bound, equivariant, gates, gconv, relax, sign, strip, weights
from ace.symmetry import Symmetry, call_model, diagnostics, equivariance_deviation, groups, testing
from ace.train import Trainer

__version__ = "0.2.0"

__all__ = [
    "bound",
    "DeviationConstraint",
    "diagnostics",
    "DualSettings",
    "GateConstraint",
    "GatedLayer",
    "PrimalDual",
    "StepResult",
    "Symmetry",
    "Trainer",
    "call_model",
    "equivariance_deviation",
    "equivariant",
    "gates",
    "gconv",
    "groups",
    "relax",
    "schedules",
    "sign",
    "strip",
    "testing",
    "weights",
]
