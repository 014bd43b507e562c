"""The step's non-finite check: one host sync that reads a step's numbers and tests its gradients."""

from __future__ import annotations

import torch

__all__ = ["StepCheck"]


class StepCheck:
    """The step's one host sync: reads the small quantities of a step (loss, constraint values,
    multipliers) as floats and tests every gradient of ``parameters`` for a NaN or Inf.

    The gradients are tested by the fused kernel of torch's ``GradScaler``
    (``_amp_foreach_non_finite_check_and_unscale_``, with a scale of 1, which changes no value), one kernel
    per device and dtype where ``isfinite(g).all()`` takes five operators per tensor, into flags that persist
    between steps (reset when set): on a small model the step's fixed cost is mostly per-call overhead.
    """

    def __init__(self, parameters: list[torch.Tensor], device: torch.device) -> None:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in parameters:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.groups = list(groups.values())
        self.device = device
        devices = {device, *(p.device for p in parameters)}
        self.flags = {d: (torch.zeros(1, device=d), torch.ones(1, device=d)) for d in devices}

    def __call__(self, quantities: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[float]], bool]:
        """``(floats by quantity, whether every gradient is finite)``."""
        with torch.no_grad():
            for group in self.groups:
                grads = [p.grad for p in group if p.grad is not None]
                if grads:
                    found, one = self.flags[grads[0].device]
                    try:
                        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
                    except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
                        found += ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
            flat = [t if t.dim() == 1 else t.reshape(-1) for ts in quantities.values() for t in ts]
            flags = [found.to(self.device) for found, _ in self.flags.values()]
            numbers = torch.cat([*flat, *flags]).tolist()
        finite = not any(numbers[len(numbers) - len(flags) :])
        if not finite:
            for found, _ in self.flags.values():
                found.zero_()
        out, start = {}, 0
        for name, ts in quantities.items():
            n = sum(t.numel() for t in ts)
            out[name], start = numbers[start : start + n], start + n
        return out, finite
