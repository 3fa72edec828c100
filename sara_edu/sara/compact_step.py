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

So :func:`compact_adamw_step` runs the AdamW update itself, in fp32, one
layer at a time, with the kernel the exact path would use: torch's fused
AdamW kernel (``torch._fused_adamw_``, called as ``torch.optim.AdamW(fused=True)``
calls it) when the optimizer is fused (the default on CPU and CUDA), else
torch's single-tensor formula written out (:func:`adamw_math_`, the order of
operations of ``torch.optim.adam._single_tensor_adam`` with decoupled weight
decay). With fp32 moments it is therefore bit for bit the exact path with the
same ``fused`` setting.

Everything per layer is transient (positions decoded once, straight to int64,
for the gather and the scatter; fp32 moments; gathered values, per chunk on a
CPU, see ``CPU_CHUNK``): at most a few copies of the largest layer's trained
entries are alive at once.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .attach import flat_view
from .fused_step import can_compile, fused_adamw_entries
from .moments import init_moments, load_moments, load_moments_group, store_moments, store_moments_group

# On a CPU each layer is gathered, updated and scattered in chunks of this many entries: the scatter then
# writes cache lines that the chunk's gather has just read, instead of reading the weight from memory again
# (~2.5 of ~17 ns per entry at 10% density; 4K-16K entries measured best). A multiple of 64: torch's fused
# CPU kernel computes the last entries of each call (fewer than a vector) with scalar code, which can round
# differently. On CUDA what counts is launching few kernels: one chunk per layer.
CPU_CHUNK = 1 << 13
# Weights with fewer trained entries than this are updated together, in groups of about this many entries:
# one gather and one scatter per weight, the moments and the AdamW kernel once per group. A diffusion UNet has
# hundreds of small weights (biases, norms, attention projections); on a GPU each op on each of them costs a
# kernel launch and ~10 us of Python, far more than its arithmetic (SD 1.5: ~700 weights).
GROUP_ENTRIES = {"cpu": CPU_CHUNK}
GROUP_ENTRIES_DEFAULT = 1 << 20


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


def _new_state(state: dict, group: dict, n: int, kind: str, device) -> None:
    # the step counter where torch.optim.AdamW keeps it: on the param's device for the fused kernel, else on the CPU
    state["step"] = torch.zeros((), dtype=torch.float32, device=device if group["fused"] else "cpu")
    init_moments(state, n, kind, device)


def _adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict) -> None:
    """AdamW in place on lists of tensors with the kernel the exact path would use (``steps`` already counted):
    the fused kernel in its multi-tensor form, or torch's single-tensor formula on each."""
    beta1, beta2 = group["betas"]
    if group["fused"]:  # as torch.optim.adam._fused_adam calls it
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                            maximize=False)
        return
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        adamw_math_(param, grad, exp_avg, exp_avg_sq, float(step), float(group["lr"]), beta1, beta2, group["eps"],
                    group["weight_decay"])


def init_state(optimizer) -> None:
    """Create every weight's moments (zeros) and step counter now, not at its first step.

    The long-lived state is then allocated in one go at attach time, before the
    step's transients come and go; allocated lazily, in between them, it leaves
    holes in the heap that the process keeps as resident memory.
    """
    group = optimizer.param_groups[0]  # at attach time every param is in the one group
    for slot in optimizer.slots:
        state = optimizer.state[slot.values]
        if not state:
            _new_state(state, group, slot.count, optimizer.moments, slot.param.device)


@torch.no_grad()
def compact_adamw_step(optimizer) -> None:
    """AdamW on every weight with a gathered gradient, then scatter into the weights."""
    group_of = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ConfigError("the compact SaRA state supports plain AdamW only (amsgrad=False, maximize=False)")
        for p in group["params"]:
            group_of[p] = group
    pending, pending_entries = [], 0  # small weights waiting to be updated together

    def flush():
        nonlocal pending, pending_entries
        if pending:
            _step_group(optimizer, pending, group_of[pending[0].values])
        pending, pending_entries = [], 0

    for slot in optimizer.slots:
        grad = slot.values.grad
        if grad is None:  # as torch: a param without a gradient is left alone
            continue
        group = group_of[slot.values]
        state = optimizer.state[slot.values]
        if not state:  # e.g. resumed from a checkpoint saved before this weight's first step
            _new_state(state, group, grad.numel(), optimizer.moments, grad.device)
        limit = GROUP_ENTRIES.get(grad.device.type, GROUP_ENTRIES_DEFAULT)
        # the compiled step is one kernel per weight already: grouping would only add copies
        if slot.count < limit and not optimizer.compiled and _groupable(optimizer, slot):
            if pending and group_of[pending[0].values] is not group:
                flush()
            pending.append(slot)
            pending_entries += slot.count
            if pending_entries >= limit:
                flush()
            continue
        step_weight(optimizer, slot, grad, group)
    flush()


# The per-layer mode (step_in_backward) steps a weight in blocks of this many entries as their gradient arrives.
# A multiple of CPU_CHUNK (and so of the fused kernel's vector width): the kernels then see the same slices of
# entries as when the whole selected gradient is there, and round alike.
PIECE_ENTRIES = 1 << 16


def positions_between(positions):
    """``f(start, stop)``: the int64 positions of a weight's trained entries ``start…stop``. Plain positions are
    converted a block at a time (no int64 copy of them all); compact encodings are decoded once, here."""
    if positions.kind == "index":
        codes = positions.codes
        return lambda start, stop: codes[start:stop].long()
    idx = positions.decode(torch.int64)
    return lambda start, stop: idx[start:stop]


def step_weight(optimizer, slot, grad: torch.Tensor, group: dict) -> None:
    """AdamW on one weight's trained entries (``grad``: their selected gradient), then write them into the weight."""
    step_pieces(optimizer, slot, group, [(0, grad)])


@torch.no_grad()
def step_pieces(optimizer, slot, group: dict, pieces) -> None:
    """AdamW on one weight's trained entries, a block at a time, then write them into the weight.

    ``pieces`` yields ``(start, grad)``, the selected gradient of entries
    ``start…start + len(grad)``, in order and covering them all; every piece
    but the last is a multiple of ``PIECE_ENTRIES`` long. The per-layer mode
    hands over each block as soon as its gradient exists.
    """
    state = optimizer.state[slot.values]
    if not state:  # e.g. resumed from a checkpoint saved before this weight's first step
        _new_state(state, group, slot.count, optimizer.moments, slot.param.device)
    positions_of = positions_between(slot.positions)
    flat = flat_view(slot.param)
    exp_avg, exp_avg_sq = load_moments(state)
    state["step"] += 1  # as torch's _fused_adamw and _single_tensor_adam: the kernels do not count
    compiled = optimizer.compiled and can_compile()
    values, total = slot.values.detach(), slot.count
    for start, grad in pieces:
        stop = start + grad.numel()
        # decoded for the gather and the scatter as int64: scatter_ needs it, and on a CPU scatter_ is ~1.5x
        # faster than index_put_ with int32 positions
        idx = positions_of(start, stop)
        if compiled:
            fused_adamw_entries(flat, idx, grad, exp_avg[start:stop], exp_avg_sq[start:stop],
                                values[start:stop] if optimizer.value_copy else None, float(state["step"]), group,
                                entries=(start, total))
            continue
        grad = grad.float()
        chunk = CPU_CHUNK if flat.device.type == "cpu" else max(stop - start, 1)
        for offset in range(0, stop - start, chunk):
            part, entries = slice(offset, offset + chunk), slice(start + offset, min(start + offset + chunk, stop))
            if optimizer.value_copy:
                work = values[entries].float()  # a view of the copy, updated in place, when fp32
            else:
                work = flat.index_select(0, idx[part]).float()
            _adamw_([work], [grad[part]], [exp_avg[entries]], [exp_avg_sq[entries]], [state["step"]], group)
            if optimizer.value_copy and values.dtype != torch.float32:
                values[entries] = work
            flat.scatter_(0, idx[part], work.to(flat.dtype))
    store_moments(state, optimizer.moments, exp_avg, exp_avg_sq, optimizer.moment_generator)


def write_values(flat: torch.Tensor, positions, values: torch.Tensor) -> None:
    """Put one weight's trained values back at their positions (the exact path, after stock AdamW)."""
    if flat.device.type != "cpu" and positions.kind == "index":
        flat.index_put_((positions.codes,), values)  # int32 positions as stored: one kernel, no conversion
    else:  # on a CPU scatter_ with int64 positions is ~1.5x faster than index_put_ with int32 ones
        flat.scatter_(0, positions.decode(torch.int64), values)


def _groupable(optimizer, slot) -> bool:
    """fp32 weights, values and gradients: a group runs on them directly, with no per-weight conversions."""
    return (slot.param.dtype == slot.values.grad.dtype == torch.float32
            and (not optimizer.value_copy or slot.values.dtype == torch.float32))


def _step_group(optimizer, slots, group) -> None:
    """AdamW on several small weights at once: per weight one gather and one scatter; the moments' decoding
    and encoding and the fused AdamW kernel once for the group (lists of tensors, the kernel's multi-tensor
    form). With fp32 moments each weight's update is bit for bit its own, as the exact path computes it."""
    states = [optimizer.state[s.values] for s in slots]
    counts = [s.count for s in slots]
    flats = [flat_view(s.param) for s in slots]
    idxs = [s.positions.decode(torch.int64) for s in slots]
    device = flats[0].device
    if optimizer.value_copy:
        works = [s.values.detach() for s in slots]
    else:
        works = list(torch.empty(sum(counts), device=device).split(counts))
        for flat, idx, work in zip(flats, idxs, works):
            torch.index_select(flat, 0, idx, out=work)
    grads = [s.values.grad for s in slots]
    if optimizer.moments == "fp32":  # the stored tensors themselves, updated in place
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    else:
        m, v, ms, vs = load_moments_group(states, counts, device)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)  # as torch's _fused_adamw: the kernel does not count
    _adamw_(works, grads, ms, vs, steps, group)
    if optimizer.moments != "fp32":
        store_moments_group(states, optimizer.moments, m, v, counts, optimizer.moment_generator)
    for flat, idx, work in zip(flats, idxs, works):
        flat.scatter_(0, idx, work)
