"""ace: train any PyTorch model under equivariance constraints by constrained optimisation.

model = ace.relax(model, where=...)                       # optional gates f_eq + gamma * f_neq
trainer = ace.Trainer(model, loss, optimizer, symmetry=ace.Symmetry(...),
                      constraints=[ace.GateConstraint(equality=True)])
trainer.fit(train_loader, val_loader, epochs=10)
exact = ace.strip(model)                                  # the exactly equivariant f_eq

ace.PrimalDual is the constrained step on its own (your loop; ace.lightning.Constrained for Lightning);
ace.diagnostics measures how symmetric data and layers are; ace.gconv and ace.sign hold equivariant layers.
"""

from . import bound, diagnostics, gconv, groups, schedules, sign, testing
from .constraints import DeviationConstraint, GateConstraint
from .deviation import equivariance_deviation
from .primal_dual import DualSettings, PrimalDual, StepResult
from .relax import GatedLayer, equivariant, gates, relax, strip, weights
from .symmetry import Symmetry, call_model
from .trainer import Trainer

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
