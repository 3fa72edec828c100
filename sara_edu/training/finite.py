"""Weights that are NaN or infinite are refused where they enter: loading, training, saving.

They never turn finite again (everything computed from them is NaN), and they
come from a damaged file or a diverged run, so the error says which tensors hold
them and what to reload, instead of letting the loss blame the learning rate.
Shared by the loop (before the first step), the course model and the SD loader.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError


def non_finite_tensors(named) -> list[tuple[str, int, int]]:
    """``(name, non-finite count, size)`` of each floating-point tensor of ``(name, tensor)`` pairs with NaN or inf."""
    bad = []
    for name, t in named:
        if t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append((name, n, t.numel()))
    return bad


def listed_non_finite(bad) -> str:
    """The first three of :func:`non_finite_tensors`' entries, as ``name (n of size)``."""
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    return ", ".join(f"{name} ({n:,} of {size:,})" for name, n, size in bad[:3]) + more


def check_finite_weights(named, what: str, remedy: str) -> None:
    """Raise :class:`CheckpointError` ``"{what} N NaN or infinite values in ...: {remedy}"`` if a tensor holds one.

    NaN or inf weights never turn finite again: everything computed from them is NaN,
    so they are refused where they enter (loading, training, saving).
    """
    bad = non_finite_tensors(named)
    if bad:
        raise CheckpointError(f"{what} {sum(n for _, n, _ in bad):,} NaN or infinite values in {len(bad)} "
                              f"tensor{'s' if len(bad) > 1 else ''}: {listed_non_finite(bad)}. {remedy}")


def pipe_parameters(pipe) -> list[tuple[str, torch.Tensor]]:
    """Named parameters of a pipeline's networks: the UNet's as they are, the frozen parts' prefixed.

    ``pipe`` may also be a single module.
    """
    if isinstance(pipe, nn.Module):
        return list(pipe.named_parameters())
    named = list(pipe.unet.named_parameters())
    for part in ("text_encoder", "vae"):
        module = getattr(pipe, part, None)
        if isinstance(module, nn.Module):
            named += [(f"{part}.{n}", p) for n, p in module.named_parameters()]
    return named
