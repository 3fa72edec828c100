"""The compiled sparse step (``SaRAAdamW(compiled=True)``): one generated kernel per weight.

The stock step makes several passes over a weight's trained entries: gather
the values, torch's AdamW kernel (which reads and writes values, gradient and
both moments), write the values back into the weight; on a GPU each is a
kernel launch, ~700 weights a step on SD 1.5. Here the whole update of one
weight is a single function that ``torch.compile`` turns into one loop
(Inductor: C++/OpenMP on a CPU, Triton on a GPU, from the same code):

    for each trained entry i at position j of the weight:
        w = weight[j] (or the value copy)   g = gradient[i]
        AdamW on (w, g, m[i], v[i])         weight[j] = w

with the bias corrections, the decoupled weight decay and, where it is added to
the gradient, the nuclear-norm term (added before the call, as in the stock
step). The per-layer mode (``step_in_backward=True``) calls it on one block
of entries at a time, as their gradient arrives: ``entries`` says where the
block lies among the weight's entries, which is what the rounding depends on.

Rounding: the formula is torch's fused CPU AdamW kernel's, operation by
operation, with the step size and the bias corrections computed in float64 on
the host as that kernel does (see :func:`_update_entries`), so on a CPU the
values are the stock step's bit for bit (``tests/sara/test_fused_step.py``).
On CUDA, Triton's code rounds otherwise than torch's fused CUDA kernel
(``tests/cuda`` bounds the difference).

Compilations: ``dynamic=True``, so a weight's size is a symbol and every weight
with two or more trained entries shares one kernel per (dtype, device);
torch specialises sizes 0 and 1, so a weight with a single trained entry
compiles once more. Progressive adjustment changes only sizes, never
the kernel. :data:`COMPILE_STATS` counts the compilations and their seconds.
"""
from __future__ import annotations

import functools
import math
import time

import torch
from torch._inductor.inductor_prims import fma

from ..errors import ConfigError

#: Compilations this process ran, and the wall seconds of the calls that compiled.
COMPILE_STATS = {"compilations": 0, "seconds": 0.0}
# On a CPU the generated kernel computes the new values into a buffer, then writes them back (the weight is
# read and written): entries are passed in pieces of this many, so the buffer stays in the cache.
CPU_PIECE = 1 << 16


def _update_entries(flat, idx, grad, exp_avg, exp_avg_sq, copy, coefficients, tail_from):
    """AdamW on ``flat[idx]`` in place (and on ``copy``, when the optimizer keeps a copy of the values).

    The operations and their order are those of torch's fused CPU AdamW kernel
    (``FusedAdamKernel.cpp``, vectorised path), with its fused multiply-add in
    the first moment and the second moment rounded as its vector body and its
    scalar tail (entries from ``tail_from`` on) round it, so that on a CPU the
    result is the stock step's, bit for bit.
    """
    decay, c1, beta2, c2, bc2_sqrt, eps, neg_step_size = coefficients.unbind()
    w = (copy if copy is not None else flat[idx]).float()
    g = grad.float()
    w = w * decay
    m = fma(c1, g - exp_avg, exp_avg)  # exp_avg.lerp_(grad, 1 - beta1), as the kernel computes it
    # the stock kernel's vector body and its scalar tail (the last n mod width entries) round v differently
    tail = torch.arange(g.shape[0], device=g.device) >= tail_from
    v = torch.where(tail, fma(exp_avg_sq, beta2, c2 * g * g), fma(c2 * g, g, exp_avg_sq * beta2))
    w = w + neg_step_size * m / (v.sqrt() / bc2_sqrt + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if copy is not None:
        copy.copy_(w)
    flat.index_put_((idx,), w.to(flat.dtype))


@functools.cache
def _kernel():
    return torch.compile(_update_entries, dynamic=True, fullgraph=True)


def check_compile_option(compiled) -> None:
    if not isinstance(compiled, bool):
        raise ConfigError(f"compiled must be True or False (the fused, torch.compile'd step), got {compiled!r}")


@functools.cache
def stock_vector_width() -> int:
    """How many float32 entries torch's fused CPU AdamW updates per vector step.

    The last ``n mod width`` entries of a tensor take its scalar path, which
    rounds the second moment as ``fma(v, β2, c2·g·g)`` where the vector body
    rounds ``fma(c2·g, g, v·β2)``. Which width this build of torch uses
    depends on the CPU and the build: it is found once by running the stock
    kernel on 127 entries and seeing where the vector formula stops holding
    (1 if it holds everywhere: no tail to treat apart).
    """
    n, generator = 127, torch.Generator().manual_seed(0)
    grad = torch.randn(8, n, generator=generator) * 1e-3
    v = torch.rand(8, n, generator=generator) * 1e-7
    stock = v.clone()
    for row in range(8):
        torch._fused_adamw_([torch.zeros(n)], [grad[row]], [torch.zeros(n)], [stock[row]], [], [torch.tensor(2.0)],
                            lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                            maximize=False)
    beta2, c2 = torch.tensor(0.999), torch.tensor(1 - 0.999)
    vector = ((c2 * grad).double() * grad.double() + (v * beta2).double()).float()  # an fma, in float64
    off = (vector != stock).any(0).nonzero().flatten()
    if off.numel() == 0:
        return 1
    return next((w for w in (4, 8, 16, 32, 64) if n - n % w <= int(off[0])), 1)


def can_compile() -> bool:
    """False while a Python dispatch mode is active (e.g. the course's MemoryTracker, which sees every aten call):
    torch.compile cannot trace under one, so the step runs the stock kernels then (the same numbers)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return not _get_current_dispatch_mode_stack()


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def fused_adamw_entries(flat, idx, grad, exp_avg, exp_avg_sq, copy, step: float, group: dict, *,
                        entries: tuple[int, int] | None = None) -> None:
    """One AdamW step of one weight's trained entries (``step`` already counted), in one compiled kernel.

    ``flat`` the weight's flat view, ``idx`` int64 positions, ``grad`` the
    selected gradient, fp32 moments updated in place, ``copy`` the value copy
    or None. ``entries=(first, total)``: these are the weight's entries
    ``first…`` of ``total`` (default: all of them), for the rounding of the
    stock kernel's scalar tail.
    """
    if group.get("amsgrad") or group.get("maximize"):
        raise ConfigError("the compiled SaRA step supports plain AdamW only (amsgrad=False, maximize=False)")
    beta1, beta2 = group["betas"]
    if not 1 - beta1 < 0.5:  # the kernel's lerp takes its other branch then
        raise ConfigError(f"the compiled SaRA step needs beta1 > 0.5 (got betas={group['betas']!r}); use "
                          "compiled=False")
    lr, eps = float(group["lr"]), float(group["eps"])
    # in float64 on the host, then rounded to float32, as torch's fused AdamW computes them
    step_size = lr / (1 - beta1**step)
    coefficients = torch.tensor([1 - lr * group["weight_decay"], 1 - beta1, beta2, 1 - beta2,
                                 math.sqrt(1 - beta2**step), eps, -step_size], dtype=torch.float32,
                                device=flat.device)
    kernel = _kernel()
    piece = CPU_PIECE if flat.device.type == "cpu" else max(idx.numel(), 1)
    first, total = entries if entries is not None else (0, idx.numel())
    tail_from = (total - total % stock_vector_width() if flat.device.type == "cpu" else total) - first
    # .detach() of a view is a tensor without a ._base (same storage, same version counter): the compiled code
    # then guards on the tensors' own sizes only, not on the shapes of the weights they view
    flat = flat.detach()
    for start in range(0, idx.numel(), piece):
        part = slice(start, start + piece)
        before = _graph_count()
        began = time.perf_counter()
        kernel(flat, idx[part].detach(), grad[part].detach(), exp_avg[part].detach(),
               exp_avg_sq[part].detach(), None if copy is None else copy[part].detach(), coefficients,
               tail_from - start)
        if _graph_count() != before:
            COMPILE_STATS["compilations"] += _graph_count() - before
            COMPILE_STATS["seconds"] += time.perf_counter() - began
