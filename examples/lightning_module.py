"""A PyTorch Lightning module trained under ace constraints: ace.lightning.Constrained around your module."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
import ace.lightning
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target


class VectorField(pl.LightningModule):  # your module, unchanged: a loss and its optimisers
    def __init__(self):
        super().__init__()
        layer = lambda name, m: isinstance(m, RadialVectorLayer)  # noqa: E731
        self.net = ace.relax(RadialVectorNet(hidden=64, layers=2), where=layer, example=torch.randn(4, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(ace.weights(self), lr=3e-3)  # the gates are ace's


torch.manual_seed(0)
x = torch.randn(1024, 2)
loader = DataLoader(TensorDataset(x, target(x)), batch_size=64, shuffle=True)
model = ace.lightning.Constrained(
    VectorField(),
    [ace.GateConstraint(tolerance=0.0, equality=True)],  # ACE, Algorithm 1
    symmetry=ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector"),
)
trainer = pl.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False)
trainer.fit(model, loader)
balance = {
    k: round(v.item(), 4) for k, v in trainer.callback_metrics.items() if k.endswith(("multiplier", "gate"))
}
print(balance)
