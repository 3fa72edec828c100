"""What differs between fine-tuning methods: which parameters train, and how.

The course's loop (:func:`sara_edu.training.train`) asks a
:class:`TrainingMethod` for its optimizer and does everything else the same
way for every method, so comparisons are fair. :class:`FullFineTuning` is the
simplest method; LoRA, the selective baseline and SaRA live beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class TrainingMethod:
    """Which parameters train and how. Subclass and implement ``build_optimizer``."""

    name = "method"

    def build_optimizer(self, unet: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                        betas=(0.9, 0.999)) -> torch.optim.Optimizer:
        """Freeze/inject what the method needs on ``unet`` and return its optimizer.

        ``total_steps`` is the length of the run (SaRA uses it for progressive
        adjustment at half of training by default).
        """
        raise NotImplementedError

    def trainable_parameters(self, unet: nn.Module) -> int:
        """How many numbers this method trains (after ``build_optimizer``)."""
        return sum(p.numel() for p in unet.parameters() if p.requires_grad)


@dataclass
class FullFineTuning(TrainingMethod):
    """Train every parameter of the UNet (the paper's "full fine-tuning" baseline)."""

    name: str = "full"

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        unet.requires_grad_(True)
        return torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
