"""SHiRA, the closest sparse neighbour of SaRA in the ecosystem, through PEFT.

SHiRA (Bhardwaj et al., 2024, "Sparse High Rank Adapters") trains a sparse set
of entries of chosen ``nn.Linear`` weights, like SaRA, but as an *adapter*: per
layer a vector of ``r · (in + out)`` values (LoRA's count at rank ``r``) at
fixed positions (random by default), added to the frozen weight in every
forward. We do not reimplement it: :class:`SHiRA` calls
``peft.inject_adapter_in_model(peft.ShiraConfig(...))``.

The differences that matter for memory: SHiRA keeps its values *beside* the
weight (4 bytes), two int32 coordinates per entry (8 bytes) and AdamW moments
(8 bytes), and its forward builds a dense copy of each adapted weight
(``W + ΔW``) that autograd keeps for the backward. It supports ``nn.Linear``
only, and the same count ``r · (in + out)`` in every layer.
:func:`shira_rank_matching` picks ``r`` to match another method's count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .method import TrainingMethod


def linear_layer_names(unet: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of ``unet``: the layers SHiRA can adapt."""
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]


def shira_parameters_per_rank(unet: nn.Module, layers) -> int:
    """Entries SHiRA trains per unit of ``r`` on ``layers``: Σ (in + out)."""
    modules = dict(unet.named_modules())
    return sum(modules[n].in_features + modules[n].out_features for n in layers)


def shira_rank_matching(unet: nn.Module, n_params: int, layers=None) -> int:
    """The ``r`` whose SHiRA on ``layers`` (default: every Linear) trains closest to ``n_params`` entries.

    Raises :class:`ConfigError` when a layer would need more entries than it has.
    """
    layers = linear_layer_names(unet) if layers is None else list(layers)
    if not layers:
        raise ConfigError("SHiRA needs nn.Linear layers; this model has none")
    r = max(1, round(n_params / shira_parameters_per_rank(unet, layers)))
    modules = dict(unet.named_modules())
    too_small = [n for n in layers if r * (modules[n].in_features + modules[n].out_features)
                 > modules[n].in_features * modules[n].out_features]
    if too_small:
        raise ConfigError(f"SHiRA with r={r} (to train {n_params:,} entries) needs more entries than "
                          f"{too_small[0]} has; leave the small layers out or ask for fewer entries")
    return r


@dataclass
class SHiRA(TrainingMethod):
    """SHiRA adapters (PEFT) on ``layers`` (default: every ``nn.Linear``) with rank-equivalent ``r``."""

    r: int = 32
    layers: list | None = None
    seed: int = 0
    name: str = "shira"
    params: list = field(default_factory=list, init=False, repr=False)

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        from peft import ShiraConfig, inject_adapter_in_model

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"SHiRA r must be a positive integer, got {self.r!r}")
        layers = linear_layer_names(unet) if self.layers is None else list(self.layers)
        # exact module names, anchored, so that peft adapts these layers and no others
        pattern = "^(" + "|".join(n.replace(".", r"\.") for n in layers) + ")$"
        unet.requires_grad_(False)
        inject_adapter_in_model(ShiraConfig(r=self.r, target_modules=pattern, random_seed=self.seed), unet)
        self.params = [p for n, p in unet.named_parameters() if "shira_" in n]
        for p in self.params:
            p.requires_grad_(True)
        return torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas)

    def trainable_parameters(self, unet=None) -> int:
        return sum(p.numel() for p in self.params)
