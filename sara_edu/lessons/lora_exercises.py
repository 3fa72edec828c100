"""Graded exercises for notebook 04: LoRA from scratch, each piece checked against PEFT.

LoRA (Hu et al., 2021) keeps a layer's weight ``W`` (out x in) frozen and
learns ``ΔW = (α / r) · B A`` with ``A`` (r x in) and ``B`` (out x r). The
learner writes three pieces, mirroring notebook 03's SaRA exercises:

1. ``lora_factors(weight, rank, generator)`` -> ``(A, B)``: A small and random,
   B zero, so the adapted model starts as the pretrained one and still learns;
2. ``lora_forward(x, weight, bias, A, B, alpha)``: the frozen layer plus the
   adapter's path, scaled by ``α / r``;
3. ``lora_merge(weight, A, B, alpha)``: the plain weight ``W + (α / r) B A``
   one ships or samples with.

Each ``check_*`` compares with PEFT's own ``LoraLayer`` (the library the
course's LoRA runs through, :mod:`sara_edu.training.lora`) on small float64
cases and names the usual mistake. :func:`on_course_unet` then runs the
learner's forward and merge on the course UNet's attention projections and
prints how far they are from PEFT's.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .exercises import Verdict, _run, report

_IN, _OUT, _RANK, _ALPHA = 6, 5, 2, 3.0  # a small case with α ≠ r, so a missing or inverted scale shows


def _peft_linear(weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                 alpha: float) -> nn.Module:
    """A float64 ``nn.Linear`` holding ``weight``/``bias``, wrapped by PEFT's LoRA with the given factors."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    holder = inject_adapter_in_model(LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["layer"],
                                                lora_dropout=0.0), holder).double()
    layer = holder.layer
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if bias is not None:
            layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(_OUT, _IN, generator=g, dtype=torch.float64)
    b = torch.randn(_OUT, generator=g, dtype=torch.float64)
    A = torch.randn(_RANK, _IN, generator=g, dtype=torch.float64)
    B = torch.randn(_OUT, _RANK, generator=g, dtype=torch.float64)  # non-zero: a trained adapter
    x = torch.randn(3, _IN, generator=g, dtype=torch.float64)
    return w, b, A, B, x


def check_factors(lora_factors) -> Verdict:
    """``lora_factors(weight, rank, generator)`` -> ``(A, B)``: A (r x in) random within PEFT's bound, B (out x r) 0."""
    piece = "1. the factors"
    weight = torch.zeros(_OUT, _IN, dtype=torch.float64)
    got, failed = _run(piece, lora_factors, weight, _RANK, torch.Generator().manual_seed(0))
    if failed is not None:
        return failed
    if not (isinstance(got, tuple | list) and len(got) == 2):
        return Verdict(piece, False, "return the pair (A, B)")
    A, B = (torch.as_tensor(t) for t in got)
    if A.shape == (_OUT, _RANK) and B.shape == (_RANK, _IN):
        return Verdict(piece, False, f"A and B are swapped: A is r x in {(_RANK, _IN)} (it reads the input), "
                                     f"B is out x r {(_OUT, _RANK)} (it writes the output)")
    if A.shape != (_RANK, _IN) or B.shape != (_OUT, _RANK):
        return Verdict(piece, False, f"shapes: A must be r x in {(_RANK, _IN)} and B out x r {(_OUT, _RANK)}, "
                                     f"got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.dtype != weight.dtype or B.dtype != weight.dtype:
        return Verdict(piece, False, f"make A and B in the weight's dtype ({weight.dtype}), got {A.dtype}, {B.dtype}")
    if B.abs().max() > 0 and A.abs().max() > 0:
        return Verdict(piece, False, "B·A must be 0 at the start, so the adapted model starts as the pretrained "
                                     "one: start B at zero")
    if A.abs().max() == 0 and B.abs().max() == 0:
        return Verdict(piece, False, "A and B are both zero: then the gradient of each is zero too and nothing "
                                     "ever trains; draw A at random")
    if A.abs().max() == 0:
        return Verdict(piece, False, "PEFT draws A at random and starts B at zero (not the other way round)")
    bound = 1 / math.sqrt(_IN)  # PEFT: kaiming_uniform_(A, a=√5), i.e. uniform in ±1/√in
    if A.abs().max() > bound * (1 + 1e-9):
        return Verdict(piece, False, f"A is too large (|A| up to {A.abs().max():.2f}): draw it like PEFT, "
                                     f"uniform in ±1/√in = ±{bound:.2f}")
    again = torch.as_tensor(lora_factors(weight, _RANK, torch.Generator().manual_seed(0))[0])
    if not torch.equal(A, again):
        return Verdict(piece, False, "two calls with the same seed gave different A: draw with `generator=`")
    return Verdict(piece, True, "A random within ±1/√in and B zero, as PEFT starts them")


def _scaled_variants(alpha: float, rank: int) -> dict[str, float]:
    """The usual wrong scales, each with what to say about it."""
    return {"no scale: multiply the adapter's part by α / r": 1.0,
            "scaled by α: divide it by the rank too (α / r)": alpha,
            "scaled by r / α: the scale is α / r": rank / alpha}


def check_forward(lora_forward) -> Verdict:
    """``lora_forward(x, weight, bias, A, B, alpha)`` -> the adapted layer's output, as PEFT's ``LoraLayer``."""
    piece = "2. the forward pass"
    w, b, A, B, x = _case()
    got, failed = _run(piece, lora_forward, x.clone(), w.clone(), b.clone(), A.clone(), B.clone(), _ALPHA)
    if failed is not None:
        return failed
    with torch.no_grad():
        want = _peft_linear(w, b, A, B, _ALPHA)(x)
    got = torch.as_tensor(got)
    if got.shape != want.shape:
        return Verdict(piece, False, f"the output must have shape {tuple(want.shape)} (batch x out), got "
                                     f"{tuple(got.shape)}")
    if torch.allclose(got, want, rtol=0, atol=1e-12):
        return Verdict(piece, True, f"equals PEFT's LoraLayer to {(got - want).abs().max().item():.0e}")
    for text, scale in _scaled_variants(_ALPHA, _RANK).items():
        if torch.allclose(got, x @ w.T + b + scale * (x @ A.T) @ B.T, atol=1e-12):
            return Verdict(piece, False, text)
    if torch.allclose(got, x @ w.T + (_ALPHA / _RANK) * (x @ A.T) @ B.T, atol=1e-12):
        return Verdict(piece, False, "the frozen layer's bias is missing: x·Wᵀ + b, then the adapter")
    if torch.allclose(got, (_ALPHA / _RANK) * (x @ A.T) @ B.T, atol=1e-12):
        return Verdict(piece, False, "only the adapter's part: add the frozen layer's output x·Wᵀ + b")
    return Verdict(piece, False, f"differs from PEFT by up to {(got - want).abs().max().item():.2g}: "
                                 "y = x·Wᵀ + b + (α / r)·(x·Aᵀ)·Bᵀ")


def check_merge(lora_merge) -> Verdict:
    """``lora_merge(weight, A, B, alpha)`` -> ``W + (α / r) B A``, as PEFT's ``merge()``; W itself unchanged."""
    piece = "3. the merged weight"
    w, b, A, B, _ = _case(1)
    frozen = w.clone()
    got, failed = _run(piece, lora_merge, w, A.clone(), B.clone(), _ALPHA)
    if failed is not None:
        return failed
    layer = _peft_linear(frozen, b, A, B, _ALPHA)
    layer.merge()
    want = layer.base_layer.weight.detach()
    if not torch.equal(w, frozen):
        return Verdict(piece, False, "it changed the weight it was given: return W + ΔW as a new tensor (the "
                                     "notebook compares it with the frozen W)")
    got = torch.as_tensor(got)
    if got.shape != want.shape:
        return Verdict(piece, False, f"the merged weight has W's shape {tuple(want.shape)}, got {tuple(got.shape)}"
                                     " (ΔW = B·A, out x in)")
    if torch.allclose(got, want, rtol=0, atol=1e-12):
        return Verdict(piece, True, f"equals PEFT's merge() to {(got - want).abs().max().item():.0e}")
    for text, scale in _scaled_variants(_ALPHA, _RANK).items():
        if torch.allclose(got, frozen + scale * B @ A, atol=1e-12):
            return Verdict(piece, False, text)
    if torch.allclose(got, (_ALPHA / _RANK) * B @ A, atol=1e-12):
        return Verdict(piece, False, "that is ΔW alone: the merged weight is W + ΔW")
    return Verdict(piece, False, f"differs from PEFT by up to {(got - want).abs().max().item():.2g}: "
                                 "W + (α / r)·B·A")


CHECKS = {"lora_factors": check_factors, "lora_forward": check_forward, "lora_merge": check_merge}


def ready(**pieces) -> bool:
    """Check the three pieces (by the names of :data:`CHECKS`); print the verdicts; True when all pass."""
    return report(CHECKS, pieces, "The check on the course UNet runs once all three pieces pass.")


def on_course_unet(unet: nn.Module, lora_factors, lora_forward, lora_merge, rank: int = 4, alpha: float = 4.0,
                   seed: int = 0):
    """The learner's LoRA on every attention projection of ``unet`` next to PEFT's, one row per kind of projection
    (``attn1.to_q``: self-attention's query, ``attn2``: cross-attention to the prompt) and a total.

    Each layer gets the learner's factors with a random (trained-looking) ``B``, so the adapter's path counts;
    the columns say how many numbers LoRA trains there against the layer's weight, and how far the learner's
    forward pass and merged weight are from PEFT's (float64).
    """
    import pandas as pd

    from ..training.lora import targeted_modules

    g = torch.Generator().manual_seed(seed)
    rows = []
    for name, layer in targeted_modules(unet).items():
        w = layer.weight.detach().double()
        b = None if layer.bias is None else layer.bias.detach().double()
        A, _ = lora_factors(w, rank, g)
        B = torch.randn(w.shape[0], rank, generator=g, dtype=w.dtype) * 0.01
        x = torch.randn(4, w.shape[1], generator=g, dtype=w.dtype)
        peft = _peft_linear(w, b, A, B, alpha)
        with torch.no_grad():
            forward = (lora_forward(x, w, torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b, A, B, alpha)
                       - peft(x)).abs().max().item()
            merged = lora_merge(w, A, B, alpha)
            peft.merge()
            merge = (merged - peft.base_layer.weight).abs().max().item()
        rows.append({"projection": ".".join(name.removesuffix(".0").split(".")[-2:]),
                     "shape": str(tuple(w.shape)), "layers": 1, "LoRA numbers": rank * sum(w.shape),
                     "weights": w.numel(), "forward vs PEFT": forward, "merge vs PEFT": merge})
    table = pd.DataFrame(rows).groupby(["projection", "shape"], sort=False).agg(
        {"layers": "sum", "LoRA numbers": "sum", "weights": "sum", "forward vs PEFT": "max", "merge vs PEFT": "max"})
    table.loc[("all", ""), :] = table.sum().to_list()[:3] + [table["forward vs PEFT"].max(),
                                                              table["merge vs PEFT"].max()]
    return table.astype({"layers": int, "LoRA numbers": int, "weights": int})
