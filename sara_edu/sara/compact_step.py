"""The step of a compact :class:`~sara_edu.sara.SaRAAdamW`: AdamW written out, one layer at a time.

The exact path keeps a 1-D copy of the selected values per weight and runs
stock ``torch.optim.AdamW`` on those copies. The compact options cannot:

* ``value_copy=False`` keeps no copy. The optimizer's params are then
  *placeholders*: 1-D tensors of the right length that share a single stored
  number (``torch.zeros(1).expand(n)``), so that gradients, clipping,
  ``zero_grad``, LR schedulers and ``state_dict`` work as for any optimizer,
  while the values live only in the weight. Each step gathers them from the
  weight, updates and scatters them back.
* ``moments="bf16"``/``"8bit"`` store the moments in a format stock AdamW does
  not know (:mod:`sara_edu.sara.moments`).

So :func:`compact_adamw_step` runs the AdamW update itself, in fp32, with
torch's formula and order of operations (``torch.optim.adam._single_tensor_adam``
with decoupled weight decay). With fp32 moments it is bit for bit the exact
path with ``fused=False`` (torch's single-tensor/foreach AdamW); against the
default fused kernel it differs by float32 rounding after a step (~1e-9 on
the course model), which training amplifies to a 0.013% difference of the
update after 200 steps (``benchmarks/compact_state.py``; FID and prompt
agreement unchanged).

Everything per layer is transient (decoded positions, gathered values, fp32
moments, the denominator): at most a few copies of the largest layer's trained
entries are alive at once.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .attach import flat_view
from .moments import init_moments, load_moments, store_moments


def placeholder(n: int, like: torch.Tensor) -> torch.Tensor:
    """A leaf of length ``n`` that stores one number (all its entries share it)."""
    return torch.zeros(1, dtype=like.dtype, device=like.device).expand(n).requires_grad_(True)


def placeholder_data(n: int, like: torch.Tensor) -> torch.Tensor:
    """What to assign to a placeholder's ``.data`` to change its length to ``n``."""
    return torch.zeros(1, dtype=like.dtype, device=like.device).expand(n)


def current_values(slot, value_copy: bool) -> torch.Tensor:
    """The trained values of one weight now (the copy, or gathered from the weight)."""
    if value_copy:
        return slot.values.detach()
    return flat_view(slot.param).index_select(0, slot.idx)


def keep_values(slot, keep: torch.Tensor, value_copy: bool) -> None:
    """Shrink the trainable vector (or placeholder) to the entries where ``keep`` is True."""
    slot.values.grad = None
    if value_copy:
        slot.values.data = slot.values.data[keep]
    else:
        slot.values.data = placeholder_data(int(keep.sum()), slot.values)


def adamw_math_(param, grad, exp_avg, exp_avg_sq, step: float, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """One AdamW update in place, torch's single-tensor formula (decoupled weight decay)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def init_state(optimizer) -> None:
    """Create every weight's moments (zeros) and step counter now, not at its first step.

    The long-lived state is then allocated in one go at attach time, before the
    step's transients come and go; allocated lazily, in between them, it leaves
    holes in the heap that the process keeps as resident memory.
    """
    for slot in optimizer.slots:
        state = optimizer.state[slot.values]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            init_moments(state, slot.count, optimizer.moments, slot.param.device)


@torch.no_grad()
def compact_adamw_step(optimizer) -> None:
    """AdamW on every weight with a gathered gradient, then scatter into the weights."""
    group_of = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ConfigError("the compact SaRA state supports plain AdamW only (amsgrad=False, maximize=False)")
        for p in group["params"]:
            group_of[p] = group
    for slot in optimizer.slots:
        grad = slot.values.grad
        if grad is None:  # as torch: a param without a gradient is left alone
            continue
        group = group_of[slot.values]
        state = optimizer.state[slot.values]
        if not state:  # e.g. resumed from a checkpoint saved before this weight's first step
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            init_moments(state, grad.numel(), optimizer.moments, grad.device)
        idx = slot.idx  # decoded once for this layer
        flat = flat_view(slot.param)
        if optimizer.value_copy:
            values = slot.values.detach()
            work = values if values.dtype == torch.float32 else values.float()
        else:
            work = flat.index_select(0, idx)
            work = work if work.dtype == torch.float32 else work.float()
        exp_avg, exp_avg_sq = load_moments(state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_math_(work, grad.float(), exp_avg, exp_avg_sq, float(state["step"]), float(group["lr"]),
                    beta1, beta2, group["eps"], group["weight_decay"])
        store_moments(state, optimizer.moments, exp_avg, exp_avg_sq, optimizer.moment_generator)
        if optimizer.value_copy and work is not values:
            values.copy_(work)
        # scatter_ with int64 positions is ~1.5x faster on CPU than index_put_ with int32 ones
        flat.scatter_(0, idx.long(), work.to(flat.dtype))
