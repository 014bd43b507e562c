"""Relaxed models: gated layers f_eq + gamma f_neq, and the exact f_eq behind them.

``relax`` replaces chosen submodules of a model, in place, by :class:`GatedLayer`

    layer(x) = f_eq(x) + gamma * f_neq(x)          gamma: learnable scalar gate, gamma(0) = gate_init

where f_eq is the original (equivariant) submodule and f_neq an unconstrained branch. Constraints
on the gates (``gates(model)``) pull gamma to 0; ``equivariant(model)`` and ``strip(model)`` then
give the exactly equivariant model f_eq.

Example::

    model = ace.relax(MyEGNN(), where=MyLayer, example=batch_inputs)
    ace.gates(model)                    # {"layers.0": Parameter(1.), ...}
    with ace.equivariant(model):
        y_eq = model(x)                 # every branch skipped
    exact = ace.strip(model)            # deep copy without gates or branches
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ace.nn.bound import NORMALIZE_CHOICES, bound_branch
from ace.symmetry.action import call_model

__all__ = ["GatedLayer", "MLPBranch", "relax", "gates", "weights", "equivariant", "strip"]

Where = Callable[[str, nn.Module], bool] | type[nn.Module] | str | Sequence[str]
BranchFactory = Callable[[str, nn.Module], nn.Module]


class GatedLayer(nn.Module):
    """A relaxed layer: f_eq(*args, **kwargs) + gate * f_neq(*args, **kwargs).

    When f_eq returns a tuple and ``outputs`` is None, the branch returns a tuple of the same length and
    every entry is relaxed. With ``outputs`` set, only the entries ``outputs`` are relaxed:
    ``out[i] + gate * branch_out[j]`` for the j-th index i of ``outputs``; the branch returns the
    tuple of those entries (or a single tensor when one entry is relaxed).

    Args:
        equivariant: the exact module f_eq; kept as ``self.equivariant``.
        branch: the unconstrained module f_neq, called with the same arguments as f_eq.
        gate_init: initial value of the gate gamma.
        outputs: indices of the relaxed entries of a tuple output; ``None`` for a tensor output.

    Attributes:
        gate: ``nn.Parameter`` of shape ``()``.
        branch_enabled: ``False`` skips the branch, so the layer computes f_eq exactly
            (set by :func:`equivariant`).
    """

    def __init__(
        self,
        equivariant: nn.Module,
        branch: nn.Module,
        gate_init: float = 1.0,
        outputs: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.equivariant = equivariant
        self.branch = branch
        reference = next(equivariant.parameters(), None)
        self.gate = nn.Parameter(
            torch.tensor(
                float(gate_init),
                dtype=reference.dtype if reference is not None else None,
                device=reference.device if reference is not None else None,
            )
        )
        self.outputs = None if outputs is None else tuple(outputs)
        self.branch_enabled = True
        self.kept: list[_Call] | None = None  # the calls kept by reuse_outputs(), None outside it

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._call(self.equivariant, args, kwargs)
        if not self.branch_enabled:
            return out
        extra = self._call(self.branch, args, kwargs)
        if self.outputs is None and isinstance(out, (tuple, list)):  # every entry relaxed
            if not isinstance(extra, (tuple, list)) or len(extra) != len(out):
                raise ValueError(f"the branch must return a tuple of {len(out)} entries, like f_eq")
            return tuple(o + self.gate * e for o, e in zip(out, extra, strict=True))
        if self.outputs is None:
            return out + self.gate * extra
        if not isinstance(out, (tuple, list)):
            raise TypeError(
                f"GatedLayer(outputs={self.outputs}) expects a tuple output, got {type(out).__name__}"
            )
        extra = extra if isinstance(extra, (tuple, list)) else (extra,)
        if len(extra) != len(self.outputs):
            raise ValueError(f"branch returned {len(extra)} entries for outputs={self.outputs}")
        out = list(out)
        for i, e in zip(self.outputs, extra, strict=True):
            out[i] = out[i] + self.gate * e
        return tuple(out)

    def _call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``module(*args, **kwargs)``, or inside :func:`reuse_outputs` the output of an earlier such call."""
        if self.kept is None or self.training or torch.is_grad_enabled():
            return module(*args, **kwargs)
        for call in self.kept:
            if call.module is module and call.matches(args, kwargs):
                return call.output
        out = module(*args, **kwargs)
        self.kept.append(_Call(module, args, kwargs, out))
        return out

    def extra_repr(self) -> str:
        text = f"gate={self.gate.item():.4g}"
        if self.outputs is not None:
            text += f", outputs={self.outputs}"
        return text if self.branch_enabled else text + ", branch_enabled=False"


class _Call:
    """A call of a gated layer's f_eq or branch kept by :func:`reuse_outputs`: the module, its arguments and
    output, with the version of every tensor among them (one changed in place since makes it unusable)."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.module, self.args, self.kwargs, self.output = module, args, kwargs, output
        self.versions = [t._version for t in _tensors((args, kwargs, output))]

    def matches(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        kept = _tensors((self.args, self.kwargs, self.output))
        if [t._version for t in kept] != self.versions:
            return False
        return _same(self.args, args) and _same(self.kwargs, kwargs)


def _tensors(x: Any) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two arguments: tensors bit for bit (a NaN or a zero's sign included), containers
    entry by entry, anything else by identity or ``==``."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return False
        if a is b:
            return True
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if a.is_floating_point() and a.element_size() in _BITS:
            a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b)


@contextmanager
def reuse_outputs(model: nn.Module) -> Iterator[None]:
    """Context for evaluating several variants of ``model`` (:func:`equivariant`) on one batch: without
    gradients, a gated layer's f_eq or branch called with bitwise the same arguments as before in the context
    returns that call's output instead of computing it again. The model relaxed at one layer shares every
    layer before it with f_eq, and that layer's f_eq with f_eq's pass, so each is computed once.

    Only in eval mode (a training forward pass moves a bounded branch's power iteration) and without
    gradients; the weights must not change inside the context (the kept outputs would be stale); a kept tensor
    changed in place since is not reused. What is kept is held until the context ends: open it once per batch.
    """
    layers = [m for m in model.modules() if isinstance(m, GatedLayer)]
    for m in layers:
        m.kept = []
    try:
        yield
    finally:
        for m in layers:
            m.kept = None


class MLPBranch(nn.Module):
    """The default branch f_neq: Linear-SiLU-Linear on the first float tensor argument.

    Shapes: ``x (..., in_features) -> (..., out_features)``, the MLP acting on the last dim; with a
    tuple ``out_features`` the output is split into a tuple of ``(..., out_features[j])`` tensors.
    With ``flat_shape`` the layer changes more than the last dim (e.g. ``(B, C_in, 2) -> (B, C_out, 2)``):
    the MLP then reads ``x`` flattened after the batch dim (``in_features`` = its size) and its output is
    reshaped to ``(B, *flat_shape)``.

    Args:
        in_features: size of the last dim of the input (of the flattened input with ``flat_shape``).
        out_features: size of the output's last dim, or one size per relaxed tuple entry.
        hidden: width of the hidden layer.
        flat_shape: the output's shape after the batch dim, for layers that change more than the last dim.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        hidden: int = 64,
        flat_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.split = None if isinstance(out_features, int) else tuple(out_features)
        self.flat_shape = None if flat_shape is None else tuple(flat_shape)
        total = out_features if isinstance(out_features, int) else sum(out_features)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, total))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = _first_float_tensor(args, kwargs)
        if x is None:
            raise TypeError("MLPBranch needs a float tensor argument")
        if self.flat_shape is not None:
            return self.net(x.flatten(1)).view(x.shape[0], *self.flat_shape)
        y = self.net(x)
        return y if self.split is None else y.split(self.split, dim=-1)


def _first_float_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()), None)


def relax(
    model: nn.Module,
    where: Where,
    branch: BranchFactory | None = None,
    gate_init: float = 1.0,
    outputs: int | Sequence[int] | None = None,
    hidden: int = 64,
    example: Any = None,
    normalize: str = "spectral",
) -> nn.Module:
    """Replace the selected submodules of ``model``, in place, by :class:`GatedLayer`.

    Args:
        model: the model; its selected submodules become f_eq.
        where: which submodules to relax: a callable ``(qualified_name, module) -> bool``, an
            ``nn.Module`` subclass, or qualified names such as ``["layers.0", "layers.1"]``.
        branch: factory ``(qualified_name, module) -> f_neq``; ``None`` builds an
            :class:`MLPBranch` from the layer's first float tensor argument to its output, sized
            from the module's ``in_features``/``out_features`` or by one forward pass on ``example``.
        gate_init: initial value of every gate.
        outputs: for layers returning tuples, the indices of the relaxed entries.
        hidden: hidden width of the default branch.
        example: model inputs for sizing default branches; called as ``model(x)`` for a tensor,
            ``model(*x)`` for a tuple or list, ``model(**x)`` for a dict, ``model(x)`` otherwise.
        normalize: ``"spectral"`` bounds every branch (default or from ``branch``) with
            :func:`ace.bound.bound_branch`, so that ``|gamma_i|`` bounds how far layer i departs from
            f_eq; ``"none"`` leaves the branches free (then a small gate can hide a large branch).

    Returns:
        ``model`` itself, relaxed.

    Raises:
        ValueError: if the model is already relaxed, ``where`` selects nothing (or a module and one
            of its descendants, or the model itself), a default branch cannot be sized, or a branch
            cannot be bounded under ``normalize="spectral"``.
    """
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"relax: normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    if any(isinstance(m, GatedLayer) for m in model.modules()):
        raise ValueError(f"model is already relaxed (gated layers {list(gates(model))}); relax it once")
    outputs = (outputs,) if isinstance(outputs, int) else outputs
    selected = _select(model, where)
    layers: dict[int, tuple[str, nn.Module]] = {}
    for name, m in selected:
        layers.setdefault(id(m), (name, m))  # a module shared under several names gets one gate
    if branch is None:
        branches = _default_branches(model, list(layers.values()), outputs, hidden, example)
    else:
        branches = {id(m): branch(name, m) for name, m in layers.values()}
    if normalize == "spectral":
        for b in branches.values():
            bound_branch(b)
    gated = {key: GatedLayer(m, branches[key], gate_init, outputs) for key, (_, m) in layers.items()}
    for name, m in selected:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, gated[id(m)])
    return model


def _select(model: nn.Module, where: Where) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every selected occurrence, shared modules under each name."""
    modules: list[tuple[str, nn.Module]] = list(model.named_modules(remove_duplicate=False))
    if isinstance(where, type):
        selected = [(n, m) for n, m in modules if isinstance(m, where)]
    elif callable(where):
        selected = [(n, m) for n, m in modules if where(n, m)]
    else:
        names = [where] if isinstance(where, str) else list(where)
        known = dict(modules)
        missing = [n for n in names if not isinstance(n, str) or n not in known]
        if missing:
            raise ValueError(f"relax: no submodule named {missing}; submodules are {[n for n in known if n]}")
        selected = [(n, known[n]) for n in names]
    if not selected:
        raise ValueError(f"relax: where={where!r} selects no submodule of {type(model).__name__}")
    if any(n == "" for n, _ in selected):
        raise ValueError("relax: where selects the model itself; wrap it in a container module first")
    names = [n for n, _ in selected]
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(
            f"relax: where selects {nested[0][0]!r} and its submodule {nested[0][1]!r}; pick one"
        )
    return selected


def _default_branches(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    outputs: Sequence[int] | None,
    hidden: int,
    example: Any,
) -> dict[int, nn.Module]:
    """An :class:`MLPBranch` per layer, from its in/out_features or from a dry forward on ``example``."""
    branches: dict[int, nn.Module] = {}
    unsized = []
    for name, m in layers:
        n_in, n_out = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if outputs is None and isinstance(n_in, int) and isinstance(n_out, int):
            reference = next(m.parameters(), None)
            branch = MLPBranch(n_in, n_out, hidden=hidden)
            branches[id(m)] = branch if reference is None else branch.to(reference.device, reference.dtype)
        else:
            unsized.append((name, m))
    if not unsized:
        return branches
    if example is None:
        raise ValueError(
            f"relax: cannot size the default branch of {unsized[0][0]!r} ({type(unsized[0][1]).__name__} has "
            "no in_features/out_features); pass example=<a batch of model inputs> or branch=<factory>"
        )
    for (name, m), (x, out) in zip(unsized, _record(model, [m for _, m in unsized], example), strict=True):
        entries = [out] if outputs is None else _entries(name, out, outputs)
        if x is None or x.dim() == 0:
            raise ValueError(f"relax: layer {name!r} has no float tensor argument for the default branch")
        if all(torch.is_tensor(e) and e.shape[:-1] == x.shape[:-1] for e in entries):
            widths = entries[0].shape[-1] if outputs is None else [e.shape[-1] for e in entries]
            branch = MLPBranch(x.shape[-1], widths, hidden=hidden)
        elif outputs is None and torch.is_tensor(out) and out.dim() >= 1 and out.shape[0] == x.shape[0]:
            branch = MLPBranch(x[0].numel(), out[0].numel(), hidden=hidden, flat_shape=out.shape[1:])
        else:
            bad = next((e for e in entries if not torch.is_tensor(e) or e.shape[:-1] != x.shape[:-1]), out)
            shape = tuple(bad.shape) if torch.is_tensor(bad) else type(bad).__name__
            raise ValueError(
                f"relax: the default branch maps {name!r}'s input {tuple(x.shape)} to tensors of the same "
                f"leading shape (or the same batch dim), but it returns {shape}; pass branch= (or outputs= "
                "for a tuple)"
            )
        branches[id(m)] = branch.to(x.device, x.dtype)
    return branches


def _entries(name: str, out: Any, outputs: Sequence[int]) -> list[Any]:
    if not isinstance(out, (tuple, list)):
        raise ValueError(
            f"relax: outputs={tuple(outputs)} given but layer {name!r} returns {type(out).__name__}"
        )
    try:
        return [out[i] for i in outputs]
    except IndexError:
        raise ValueError(
            f"relax: outputs={tuple(outputs)} out of range for {name!r}'s {len(out)} outputs"
        ) from None


def _record(model: nn.Module, modules: list[nn.Module], example: Any) -> list[tuple[Any, Any]]:
    """(first float tensor argument, output) of each module's first call in one dry forward."""
    seen: dict[int, tuple[Any, Any]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.setdefault(id(module), (_first_float_tensor(args, kwargs), output))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    training = model.training
    try:
        model.eval()  # no batch-norm statistics updated by the dry run
        with torch.no_grad():
            call_model(model, example)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    missing = [type(m).__name__ for m in modules if id(m) not in seen]
    if missing:
        raise ValueError(f"relax: layers {missing} were not called by the model on example=")
    return [seen[id(m)] for m in modules]


def gates(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gate of every :class:`GatedLayer`, by qualified module name (e.g. ``"layers.0"``)."""
    return {name: m.gate for name, m in model.named_modules() if isinstance(m, GatedLayer)}


def weights(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters without its gates: what an optimiser needs when :class:`ace.PrimalDual` steps
    the gates (``torch.optim.Adam(ace.weights(model))``)."""
    gate_ids = {id(g) for g in gates(model).values()}
    return [p for p in model.parameters() if id(p) not in gate_ids]


@contextmanager
def equivariant(model: nn.Module, keep: Collection[str] = ()) -> Iterator[nn.Module]:
    """Context in which every :class:`GatedLayer` of ``model`` skips its branch: exactly f_eq.

    Layers named in ``keep`` (qualified names, as in :func:`gates`) keep their branch, so
    ``equivariant(model, keep=[name])`` is the model relaxed at that one layer: the deviation measured
    inside it is what that layer's branch alone costs. The previous ``branch_enabled`` flags come back on
    exit, also after an exception, so the contexts nest.
    """
    named = {name: m for name, m in model.named_modules() if isinstance(m, GatedLayer)}
    unknown = sorted(set(keep) - set(named))
    if unknown:
        raise ValueError(
            f"equivariant(keep=...): no gated layer named {unknown}; gated layers are {list(named)}"
        )
    layers = [m for name, m in named.items() if name not in keep]
    previous = [m.branch_enabled for m in layers]
    for m in layers:
        m.branch_enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(layers, previous, strict=True):
            m.branch_enabled = flag


def strip(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`GatedLayer` replaced by its f_eq module.

    The copy has no gates and no branch parameters; ``model`` is left untouched.
    """
    model = copy.deepcopy(model)
    return _unwrap(model)


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, GatedLayer):
        module = module.equivariant
    for name, child in module.named_children():
        setattr(module, name, _unwrap(child))
    return module
