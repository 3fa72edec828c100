"""The gradient SaRA leaves on a weight: only its selected entries.

SaRA never keeps a weight's dense gradient (that is its memory saving), yet the
ordinary lines of a training loop read ``p.grad`` through the model::

    accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)   # diffusers
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    unet.zero_grad()

So after each backward pass a SaRA weight's ``.grad`` is a :class:`SelectedGrad`:
a tensor with the weight's shape whose only stored numbers are the selected
entries (a 1-D vector, which *is* the optimizer's gradient, plus the int32/int64
positions SaRA already holds; every other entry is an exact zero). No extra
memory. It does what those lines need, on the selected values:

* norms (``torch.linalg.vector_norm``, ``.norm()``): ``clip_grad_norm_``
  returns the true norm of the selected gradient;
* in-place scaling and clamping (``mul_``, ``div_``, ``clamp_``): clipping
  and loss-scale unscaling change the optimizer's gradient;
* ``zero_()`` and ``p.grad = None`` (``model.zero_grad()``) clear it;
* ``+=`` a dense gradient: autograd accumulates the next backward pass into
  it directly (gradient accumulation keeps no dense gradient either).

Any other operation raises :class:`~sara_edu.errors.ConfigError` naming the
weight (``.to_dense()`` gives a dense copy), so nothing silently computes on a
partial gradient. A sparse COO tensor would be the stock alternative, but in
torch 2.13 ``clip_grad_norm_`` fails on it (``linalg_vector_norm`` has no
sparse kernel) and its int64 N-d indices cost 16 bytes per selected entry of a
matrix on top of the 4 of the value.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

aten = torch.ops.aten


class SelectedGrad(torch.Tensor):
    """A weight-shaped gradient stored as ``values`` at flat ``positions`` (zero elsewhere).

    ``values`` is the very tensor the optimizer steps with, so whatever the
    loop does to ``p.grad`` (clipping, unscaling) is what the update uses.
    """

    values: torch.Tensor
    positions: object  # a tensor, or SaRA's compact encoding of it (see indices())
    weight_name: str
    guard: object  # called before a norm is taken (distributed SaRA refuses unsynchronised norms)

    @staticmethod
    def __new__(cls, shape, positions, values, name="weight", guard=None):
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=values.dtype, device=values.device,
                                                   requires_grad=False)

    def __init__(self, shape, positions, values, name="weight", guard=None):
        self.values = values
        self.positions = positions
        self.weight_name = name
        self.guard = guard

    def _like(self, values) -> SelectedGrad:
        return SelectedGrad(self.shape, self.positions, values, self.weight_name, self.guard)

    def indices(self) -> torch.Tensor:
        """The flat positions as a tensor (SaRA's compact position codes are decoded here, transiently)."""
        return self.positions if isinstance(self.positions, torch.Tensor) else self.positions.decode()

    def to_dense(self, masked_grad=None) -> torch.Tensor:  # torch's signature; masked_grad is unused
        """The dense gradient (zeros off the selection); allocates a full copy of the weight."""
        out = torch.zeros(self.shape.numel(), dtype=self.dtype, device=self.device)
        out.scatter_(0, self.indices().long(), self.values)
        return out.view(self.shape)

    def __repr__(self):
        return (f"SelectedGrad({self.weight_name}, shape={tuple(self.shape)}, selected={self.values.numel()}, "
                f"dtype={self.dtype})")

    def __reduce_ex__(self, protocol):
        raise ConfigError(f"the gradient of {self.weight_name!r} is SaRA's SelectedGrad and is not saved with the "
                          "model; save the optimizer's state_dict() (it holds everything needed to resume)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_"):  # clip_grad_*(foreach=True) and friends: one tensor at a time
            return _foreach(func, name, args, kwargs)
        handler = _HANDLERS.get(name)
        if handler is None:
            raise ConfigError(_unsupported(func, args))
        return handler(func, *args, **kwargs)


def _first(args) -> SelectedGrad:
    return next(a for a in args if isinstance(a, SelectedGrad))


def _unsupported(func, args) -> str:
    g = _first(args)
    return (f"the gradient of {g.weight_name!r} is SaRA's SelectedGrad (only its {g.values.numel():,} trained "
            "entries are stored; the rest of the weight does not train), and "
            f"{func.overloadpacket.__name__} is not supported on it. Supported: norms and "
            "clip_grad_norm_/clip_grad_value_, in-place scaling (mul_, div_), clamp_, zero_ and zero_grad(). "
            "For a dense copy use p.grad.to_dense(); the optimizer's own gradients are "
            "[v.grad for v in optimizer.param_groups[0]['params']]." + _ddp_hint())


def _ddp_hint() -> str:
    """On several processes the likely caller is DistributedDataParallel's reducer: say how that happens."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ""
    return (" On several processes this usually comes from DistributedDataParallel reducing SaRA's weight as a "
            "dense gradient: create SaRAAdamW on the bare model before wrapping it, and wrap that same module "
            "(not a parent of it).")


def _as_entries(other, g: SelectedGrad):
    """``other`` at the selected positions: a number, a 0-d/1-element tensor, or a weight-shaped tensor."""
    if isinstance(other, SelectedGrad):
        if other.positions is not g.positions and not torch.equal(other.indices(), g.indices()):
            raise ConfigError(f"cannot combine SaRA gradients of {g.weight_name!r} with different selections")
        return other.values
    if isinstance(other, torch.Tensor) and other.numel() != 1:
        if tuple(other.shape) != tuple(g.shape):
            raise ConfigError(f"cannot combine the SaRA gradient of {g.weight_name!r} {tuple(g.shape)} with a "
                              f"tensor of shape {tuple(other.shape)}")
        return other.reshape(-1).index_select(0, g.indices())
    return other


def _vector_norm(func, g, ord=2, dim=None, keepdim=False, dtype=None):
    if dim is not None and list(dim) != list(range(g.dim())):
        raise ConfigError(f"SaRA's gradient of {g.weight_name!r} supports whole-tensor norms only (got dim={dim})")
    if g.guard is not None:
        g.guard()
    ord = float(ord)
    full = g.values.numel() == g.shape.numel()
    if not full and (ord <= 0 or ord == float("-inf")):  # the unselected zeros decide these norms
        raise ConfigError(f"norm of order {ord} of SaRA's gradient of {g.weight_name!r} is not supported (use ord > 0)")
    values = g.values if g.values.numel() else g.values.new_zeros(1)
    out = torch.linalg.vector_norm(values, ord, dtype=dtype)
    return out.reshape([1] * g.dim()) if keepdim else out


def _legacy_norm(func, g, p=2, dim=None, keepdim=False, dtype=None):
    return _vector_norm(func, g, 2 if p is None else p, dim, keepdim, dtype)


def _inplace(op):
    def run(func, g, *args, **kwargs):
        args = [_as_entries(a, g) for a in args]
        getattr(g.values, op)(*args, **kwargs)
        return g
    return run


def _clamp_(func, g, min=None, max=None):
    # the unselected entries are exact zeros: the clamp must leave zero where it is
    if (min is not None and float(min) > 0) or (max is not None and float(max) < 0):
        raise ConfigError(f"clamping SaRA's gradient of {g.weight_name!r} to [{min}, {max}] would move its "
                          "untrained zeros")
    g.values.clamp_(min=min, max=max)
    return g


def _add_(func, g, other, alpha=1):
    """``grad += new_grad`` (autograd's gradient accumulation): only the selected entries are kept."""
    g.values.add_(_as_entries(other, g), alpha=alpha)
    return g


def _alias(func, g, *args, **kwargs):
    return g._like(g.values)


def _clone(func, g, *args, **kwargs):
    return g._like(g.values.clone())


def _zero_(func, g):
    g.values.zero_()
    return g


_HANDLERS = {
    "linalg_vector_norm": _vector_norm,
    "norm": _legacy_norm,
    "mul_": _inplace("mul_"),
    "div_": _inplace("div_"),
    "clamp_": _clamp_,
    "clamp_min_": lambda func, g, v: _clamp_(func, g, min=v),
    "clamp_max_": lambda func, g, v: _clamp_(func, g, max=v),
    "zero_": _zero_,
    "add_": _add_,
    "detach": _alias,
    "alias": _alias,
    "clone": _clone,
}


def _foreach(func, name, args, kwargs):
    """Apply a ``_foreach_*`` op element by element (the lists may mix SelectedGrads and dense tensors)."""
    single = getattr(aten, name[len("_foreach_"):], None)
    if name == "_foreach_norm":
        single = aten.linalg_vector_norm
    if single is None:
        raise ConfigError(_unsupported(func, [a for a in args[0] if isinstance(a, SelectedGrad)]))
    tensors, rest = args[0], list(args[1:])
    out = []
    for i, t in enumerate(tensors):
        extra = [r[i] if isinstance(r, (list, tuple)) else r for r in rest]
        out.append(single(t, *extra, **kwargs))
    return None if name.endswith("_") else out


STEP_IN_BACKWARD_ONCE = (
    "with step_in_backward=True SaRA updates each weight inside backward(), once per step: call "
    "optimizer.step() and optimizer.zero_grad() after every backward pass. Gradient accumulation over several "
    "backward passes is not possible in this mode; use the default step_in_backward=False for it")


class StepTakenGrad(SelectedGrad):
    """What a weight (and its optimizer values) show as ``.grad`` once ``step_in_backward`` has updated them.

    The update has happened and its gradient is gone, so there is nothing left
    to clip, unscale or accumulate into: every operation but ``detach`` raises
    a :class:`~sara_edu.errors.ConfigError` that says why and what to do,
    instead of clipping or unscaling nothing (a zero norm, a skipped check).
    """

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        taken = [a for a in _flat(args) if isinstance(a, StepTakenGrad)]
        if name in ("detach", "alias"):
            return taken[0]
        if name in ("add_", "add", "_foreach_add_", "_foreach_add"):
            raise ConfigError(f"a second gradient arrived for {taken[0].weight_name!r}: " + STEP_IN_BACKWARD_ONCE)
        raise ConfigError(
            f"the gradient of {taken[0].weight_name!r} was applied already: with step_in_backward=True SaRA updates "
            f"each weight inside backward(), as soon as its gradient exists, and keeps no gradient, so {name} has "
            "nothing to act on. Global gradient clipping (clip_grad_norm_) and GradScaler (unscale_, step) need every "
            "gradient before any update: use the default step_in_backward=False for them (bf16 autocast needs no "
            "GradScaler). Weights updated in this backward pass were updated without them.")


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a
