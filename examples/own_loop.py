"""ace's constraints in your own training loop: a plain PyTorch loop around ace.PrimalDual."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

torch.manual_seed(0)
x = torch.randn(1024, 2)
loader = DataLoader(TensorDataset(x, target(x)), batch_size=64, shuffle=True)
model = ace.relax(
    RadialVectorNet(hidden=64, layers=2), where=lambda n, m: isinstance(m, RadialVectorLayer), example=x[:4]
)
symmetry = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")

core = ace.PrimalDual(
    model,
    torch.optim.Adam(ace.weights(model), lr=3e-3),  # or model.parameters(): ace steps the gates either way
    [ace.GateConstraint(tolerance=0.0, equality=True)],  # ACE, Algorithm 1
    symmetry=symmetry,
)
for epoch in range(10):
    for xb, yb in loader:
        with core.cached():  # bounded branches: one spectral normalisation per step
            out = model(xb)
            result = core.step(nn.functional.mse_loss(out, yb), inputs=xb, output=out)
    gates = [round(g.item(), 4) for g in result.gates.values()]
    multipliers = [round(m, 4) for m in result.multipliers["gate"].tolist()]
    print(f"epoch {epoch}: loss {result.loss.item():.4f}, gates {gates}, multipliers {multipliers}")
exact = ace.strip(model)  # f_eq alone: exactly equivariant
