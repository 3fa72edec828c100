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

from ..errors import CheckpointError


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

    # A checkpoint stores what the method changed; resuming rebuilds the method on a fresh copy of the base
    # model (``build_optimizer``) and then writes this state back, before the optimizer's own state.
    def trained_state(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep of ``unet``: by default every trainable parameter."""
        return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore_trained_state(self, unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(unet.named_parameters())
        missing = sorted(set(tensors) - set(own))
        if missing:
            raise CheckpointError(f"the checkpoint holds weights this model does not have (e.g. {missing[0]}): "
                                  "resume with the same base model and method")
        for name, value in tensors.items():
            own[name].copy_(value)


class SparseMethod(TrainingMethod):
    """A method whose optimizer trains chosen entries in place (SaRA, the selective baseline).

    Its checkpoints keep only the trained entries (positions and values), not whole weights.
    """

    optimizer = None

    def trained_state(self, unet):
        own = dict(unet.named_parameters())
        out = {}
        for name, idx in self.optimizer.trained_entries().items():
            if idx.numel():
                out[f"{name}::indices"] = idx
                out[f"{name}::values"] = own[name].detach().reshape(-1).index_select(0, idx.long())
        return out

    @torch.no_grad()
    def restore_trained_state(self, unet, tensors):
        own = dict(unet.named_parameters())
        for key, idx in tensors.items():
            if key.endswith("::indices"):
                name = key.removesuffix("::indices")
                if name not in own or f"{name}::values" not in tensors:
                    raise CheckpointError(f"the checkpoint does not fit this model ({name}): resume with the same "
                                          "base model and method")
                own[name].view(-1)[idx.long()] = tensors[f"{name}::values"].to(own[name].dtype)


@dataclass
class FullFineTuning(TrainingMethod):
    """Train every parameter of the UNet (the paper's "full fine-tuning" baseline).

    ``target_modules``: train only the parameters whose full name one of these
    regular expressions finds (SaRA's rule, :func:`~sara_edu.sara.selection.considered_parameters`),
    e.g. the attention projections' weights: dense training *where* LoRA trains,
    a control that separates where a method trains from how.
    """

    name: str = "full"
    target_modules: object = None

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        if self.target_modules is None:
            unet.requires_grad_(True)
            return torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
        from ..sara.selection import considered_parameters

        chosen = considered_parameters(unet, self.target_modules, include_frozen=True)  # refuses a pattern
        unet.requires_grad_(False)                                                     # that matches nothing
        for _, p in chosen:
            p.requires_grad_(True)
        return torch.optim.AdamW([p for _, p in chosen], lr=lr, weight_decay=weight_decay, betas=betas)
