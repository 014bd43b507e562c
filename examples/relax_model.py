"""Relax an equivariant model with gated non-equivariant branches, train with ACE, strip the branches."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

torch.manual_seed(0)
x = torch.randn(1024, 2)
loader = DataLoader(TensorDataset(x, target(x)), batch_size=64, shuffle=True)

model = RadialVectorNet(hidden=64, layers=2)  # exactly SO(2)-equivariant
ace.relax(model, where=lambda name, m: isinstance(m, RadialVectorLayer), example=x[:4])  # f_eq + gamma f_neq
symmetry = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")
trainer = ace.Trainer(
    model,
    nn.functional.mse_loss,
    torch.optim.Adam(model.parameters(), lr=3e-3),  # ace steps the gates itself (and says so once)
    symmetry=symmetry,
    constraints=[ace.GateConstraint(tolerance=0.0, equality=True)],  # ACE, Algorithm 1
)
trainer.fit(loader, loader, epochs=10)
exact = ace.strip(model).double()  # f_eq alone: exactly equivariant
ace.testing.assert_equivariant(exact, x[:8].double(), symmetry)
print("gates:", {name: round(g.item(), 5) for name, g in ace.gates(model).items()})
