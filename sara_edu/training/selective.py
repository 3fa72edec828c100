"""The selective fine-tuning baseline (LT-SFT style): same mask as SaRA, no memory trick.

It trains exactly the entries SaRA would train (``|w| < θ``), the textbook way:
the weights keep their **dense** gradients, a gradient hook zeroes the
unselected entries, and a standard dense ``torch.optim.AdamW`` updates whole
weights (so its moments are dense too). Comparing it with
:class:`~sara_edu.training.SaRA` isolates what SaRA's unstructured
backpropagation saves: same numbers trained, very different memory.

Weight decay: dense AdamW would shrink *every* entry (``w ← w·(1-lr·wd)``),
unselected ones included, so the baseline would no longer be sparse. We run
AdamW with ``weight_decay=0`` and apply the same decoupled decay ourselves, on
the selected entries only, just before the Adam update (where AdamW applies
it). Unselected entries have zero gradient and zero moments, so Adam's update
for them is exactly zero and they stay bit-for-bit unchanged.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..errors import ConfigError
from ..sara.attach import attached_model, check_attachable, check_is_model, mark_attached, release_model
from ..sara.optimizer import adamw_update
from ..sara.selection import Selection, check_selection_args, select_parameters
from ..sara.sparse_file import save_sparse
from .method import SparseMethod


class MaskedAdamW(torch.optim.AdamW):
    """Dense AdamW on the weights that have selected entries, with masked grads and masked decay."""

    def __init__(self, model: nn.Module, selection: Selection, lr: float = 1e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        check_is_model(model, type(self).__name__)
        check_attachable(model, type(self).__name__)
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        own = dict(model.named_parameters())
        self.selection = selection
        self.masked_weight_decay = float(weight_decay)
        self.detached = False
        self._model_ref = weakref.ref(model)
        self._requires_grad_before = {n: p.requires_grad for n, p in own.items()}
        self.names = [n for n in selection.names if selection.indices[n].numel()]
        self.masks = {n: selection.mask(n).to(own[n].device) for n in self.names}
        params = [own[n] for n in self.names]
        # the same stock kernel as SaRAAdamW (fused where torch has it), so timings compare the memory trick only
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=fused)
        model.requires_grad_(False)
        self._handles = []
        for n, p in zip(self.names, params):
            p.requires_grad_(True)
            mask = self.masks[n]
            # where(), not multiply: an inf/NaN in an unselected grad entry must not leak in.
            self._handles.append(p.register_hook(lambda g, mask=mask: torch.where(mask, g, g.new_zeros(()))))
        mark_attached(model, params, self)

    @torch.no_grad()
    def step(self, closure=None):
        if self.detached:
            raise ConfigError("this optimizer was detached from its model; create a new one to keep training")
        if self.masked_weight_decay:
            for group in self.param_groups:
                factor = 1 - group["lr"] * self.masked_weight_decay
                for n, p in zip(self.names, group["params"]):
                    if p.grad is not None:  # AdamW decays only params that have a grad
                        p.copy_(torch.where(self.masks[n], p * factor, p))
        return adamw_update(self, closure)

    @property
    def model(self) -> nn.Module:
        return attached_model(self)

    @property
    def num_trainable(self) -> int:
        return self.selection.total_selected

    def trained_entries(self) -> dict[str, torch.Tensor]:
        return dict(self.selection.indices)

    def config(self) -> dict:
        return {"method": "selective", "mode": self.selection.mode, "requested": self.selection.requested}

    def detach(self, requires_grad: bool | None = None) -> nn.Module | None:
        """Remove the grad hooks and marks; restore (or set) the requires_grad flags."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return release_model(self, [p for g in self.param_groups for p in g["params"]], requires_grad)


@dataclass
class SelectiveFineTuning(SparseMethod):
    """Train the entries with ``|w| < θ`` using dense masked gradients and dense AdamW.

    ``threshold`` (absolute θ) wins over ``fraction`` when given. As SaRA,
    parameters frozen before training stay frozen unless ``include_frozen=True``. Same
    ``report()``, ``save(path)`` (a sparse file :func:`~sara_edu.sara.load_sparse`
    reads) and ``detach()`` as :class:`~sara_edu.training.SaRA`.
    """

    threshold: float | None = None
    fraction: float | None = 0.1
    per_layer: bool = False
    target_modules: object = None
    layer_types: object = None
    include_frozen: bool = False
    name: str = "selective"
    optimizer: MaskedAdamW | None = field(default=None, init=False, repr=False)

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        fraction = None if self.threshold is not None else self.fraction
        check_selection_args(self.threshold, fraction, self.per_layer)
        if self.optimizer is not None and not self.optimizer.detached and self.optimizer._model_ref() is unet:
            self.optimizer.detach()
        check_attachable(unet, type(self).__name__)
        selection = select_parameters(unet, self.threshold, fraction, self.per_layer, self.target_modules,
                                      self.layer_types, self.include_frozen)
        self.optimizer = MaskedAdamW(unet, selection, lr=lr, betas=betas, weight_decay=weight_decay)
        return self.optimizer

    def _opt(self) -> MaskedAdamW:
        if self.optimizer is None:
            raise ConfigError("SelectiveFineTuning has not been attached yet: run train(..., method=...) first")
        return self.optimizer

    def trainable_parameters(self, unet=None) -> int:
        return self._opt().num_trainable

    def report(self) -> pd.DataFrame:
        return self._opt().selection.report()

    def save(self, path, metadata: dict | None = None):
        return save_sparse(self, path, metadata)

    def detach(self, requires_grad: bool | None = None):
        return self._opt().detach(requires_grad)

    merge = detach
