"""Wrap your own model: a plain MLP trained under a tightening equivariance-deviation constraint."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace

torch.manual_seed(0)
x = torch.randn(512, 2)  # planar points and a rotation-equivariant field: y(Rx) = R y(x)
y = x.norm(dim=1, keepdim=True) * x
loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

model = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 2))  # any model
trainer = ace.Trainer(
    model,
    nn.functional.mse_loss,
    torch.optim.Adam(model.parameters(), lr=3e-3),
    symmetry=ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector"),
    constraints=[
        ace.DeviationConstraint(
            tolerance=ace.schedules.Cosine(start="auto", end=1e-2, steps=400), relative=True, samples=2
        )
    ],
    dual=ace.DualSettings(lr=10.0),
)
summary = trainer.fit(loader, loader, epochs=50)
print(summary["constraints"]["deviation"])  # final tolerance, deviation, violation, multiplier
