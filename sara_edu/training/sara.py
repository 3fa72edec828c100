"""SaRA as a method of the course's training loop (:func:`sara_edu.training.train`).

A thin object around :class:`~sara_edu.sara.SaRAAdamW`: it builds the
optimizer when the loop starts (progressive adjustment at half of the run by
default, as the authors) and gives notebooks their reports (``report()``,
``churn``, ``save``, ``detach``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..errors import ConfigError
from ..sara.optimizer import SaRAAdamW
from ..sara.selection import check_selection_args
from ..sara.sparse_file import save_sparse
from .method import SparseMethod


@dataclass
class SaRA(SparseMethod):
    """SaRA for :func:`sara_edu.training.train`, with notebook-friendly reports.

    ``threshold`` (absolute θ) wins over ``fraction`` when given. Parameters
    frozen before training stay frozen unless ``include_frozen=True``.
    ``progressive_iter``: ``"half"`` of ``total_steps`` (the authors' default),
    a step number, or None. After ``build_optimizer``: ``.optimizer``,
    ``.report()``, ``.churn``, ``.save(path)``, ``.detach()``.

    Calling ``build_optimizer`` again on the same model (e.g. a second
    ``train`` call) first detaches this object's previous attachment and then
    selects afresh from the current weights; attaching to a model that another
    SaRA/selective object manages is an error.

    ``compact``, ``value_copy``, ``positions``, ``moments``: how the optimizer
    keeps its state per trained entry (see :class:`~sara_edu.sara.SaRAAdamW`;
    the defaults are exact, ``compact=True`` keeps ~5 bytes instead of 16).

    ``nuclear_targets``, ``nuclear_of``, ``reset_moments``, ``nuclear_via``: the authors'
    variants of the nuclear-norm term and of progressive adjustment, and whether the term goes through AdamW (see
    :class:`~sara_edu.sara.SaRAAdamW`; the defaults follow the paper's text).
    ``compiled``: the fused, ``torch.compile``'d step (same numbers); ``step_in_backward``: each weight is updated
    inside the backward pass and no selected gradient is kept (needs ``train(max_grad_norm=None)``, one process,
    no gradient accumulation, no fp16 scaler); ``cuda_graphs``: the exact step captured as a CUDA graph (a model
    on a GPU; see :mod:`sara_edu.sara.cuda_graph`).
    """

    threshold: float | None = None
    fraction: float | None = 0.1
    per_layer: bool = False
    rank_lambda: float = 5e-4
    progressive_iter: str | int | None = "half"
    nuclear_every: int = 1
    target_modules: object = None
    layer_types: object = None
    seed: int = 0
    nuclear_max_numel: int | None = None
    include_frozen: bool = False
    compact: bool = False
    value_copy: bool | None = None
    positions: str | None = None
    moments: str | None = None
    nuclear_targets: str = "2d"
    nuclear_of: str = "update"
    reset_moments: bool = False
    nuclear_via: str = "adam"
    compiled: bool = False
    step_in_backward: bool = False
    cuda_graphs: bool = False
    name: str = "sara"
    optimizer: SaRAAdamW | None = field(default=None, init=False, repr=False)

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        fraction = None if self.threshold is not None else self.fraction
        check_selection_args(self.threshold, fraction, self.per_layer)
        progressive = self.progressive_iter
        if progressive == "half":
            progressive = total_steps // 2 or None  # a 1-step run has no second half
        elif progressive is not None and (isinstance(progressive, str) or isinstance(progressive, bool)):
            raise ConfigError(f"progressive_iter must be 'half', a step number or None, got {progressive!r}")
        if self.optimizer is not None and not self.optimizer.detached and self.optimizer._model_ref() is unet:
            self.optimizer.detach()
        self.optimizer = SaRAAdamW(unet, lr=lr, threshold=self.threshold, fraction=fraction,
                                   per_layer=self.per_layer, rank_lambda=self.rank_lambda,
                                   progressive_iter=progressive, nuclear_every=self.nuclear_every,
                                   target_modules=self.target_modules, layer_types=self.layer_types,
                                   betas=betas, weight_decay=weight_decay, seed=self.seed,
                                   total_steps=total_steps, nuclear_max_numel=self.nuclear_max_numel,
                                   include_frozen=self.include_frozen, compact=self.compact,
                                   value_copy=self.value_copy, positions=self.positions, moments=self.moments,
                                   nuclear_targets=self.nuclear_targets, nuclear_of=self.nuclear_of,
                                   reset_moments=self.reset_moments, nuclear_via=self.nuclear_via,
                                   compiled=self.compiled, step_in_backward=self.step_in_backward,
                                   cuda_graphs=self.cuda_graphs)
        return self.optimizer

    def _opt(self) -> SaRAAdamW:
        if self.optimizer is None:
            raise ConfigError("SaRA has not been attached yet: run train(pipe, data, method=...) "
                              "or method.build_optimizer(unet, ...) first")
        return self.optimizer

    def trainable_parameters(self, unet=None) -> int:
        return self._opt().num_trainable

    def report(self) -> pd.DataFrame:
        return self._opt().report()

    @property
    def churn(self) -> pd.DataFrame | None:
        return self._opt().churn

    def save(self, path, metadata: dict | None = None):
        return save_sparse(self, path, metadata)

    def detach(self, requires_grad: bool | None = None):
        return self._opt().detach(requires_grad)

    merge = detach
