"""SaRAAdamW: the optimizer that *is* SaRA (selection, unstructured backpropagation, step).

Adopting SaRA in your own training loop is one line, the optimizer::

    optimizer = SaRAAdamW(unet, lr=1e-4, threshold=2e-3, rank_lambda=5e-4,
                          progressive_iter=500, weight_decay=1e-2)

How it works (Hu et al., ICLR 2025):

* **Sparse**: only the "temporarily ineffective" entries ``|w| < θ`` train
  (:mod:`sara_edu.sara.selection`); every other entry stays bit-for-bit the same.
* **Unstructured backpropagation**: the trainable state is, per parameter, a
  1-D vector of the selected values plus its AdamW moments (the optimizer's
  params are these vectors, so the update is stock ``torch.optim.AdamW``,
  fused/foreach). A post-accumulate-grad hook on each weight gathers
  ``grad.flatten()[idx]`` into the vector's grad and replaces the dense
  ``.grad`` at once by a :class:`~sara_edu.sara.grad.SelectedGrad` that holds
  just that vector: a layer's dense gradient lives only while autograd hands it
  over, the model-sized gradient never exists, and ``clip_grad_norm_(model.parameters())``
  and ``model.zero_grad()`` still act on SaRA's gradients. After ``step()``
  the vectors are scattered back into the weights.
* **Several processes**: the selected gradients are all-reduced by SaRA
  itself (:mod:`sara_edu.sara.distributed`, which says how to prepare model
  and optimizer under Accelerate or torchrun).
* **Low rank**: the nuclear-norm (sub)gradient of one randomly chosen 2-D
  weight per step is added inside ``step()`` (:mod:`sara_edu.sara.nuclear`).
* **Progressive adjustment**: at ``progressive_iter``
  (:mod:`sara_edu.sara.progressive`).

The weights are trained in place, so a trained model *is* the merged model:
:func:`~sara_edu.sara.attach.detach` only removes the hooks.
"""
from __future__ import annotations

import functools
import math
import random
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .attach import (
    attached_model,
    check_attachable,
    check_is_model,
    flat_view,
    mark_attached,
    release_model,
)
from .compact_step import (
    compact_adamw_step,
    current_values,
    init_state,
    placeholder,
    placeholder_data,
    write_values,
)
from .distributed import (
    DDPCompanion,
    GradientSync,
    check_runtime,
    check_supported_setup,
    distributed_run,
)
from .cuda_graph import StepGraphs, buffer_fits, check_graph_option
from .fused_step import check_compile_option
from .grad import SelectedGrad
from .in_backward import finish_step, hook_step
from .moments import check_moment_kind, convert_moments, moment_kind
from .nuclear import nuclear_norm_grad_at
from .positions import check_position_kind, encode_positions
from .progressive import progressive_adjust
from .selection import (
    Selection,
    check_selection_args,
    considered_parameters,
    select_parameters,
)


@dataclass(eq=False)
class _Slot:
    """One considered weight: its selected positions and their trainable values."""

    name: str
    param: nn.Parameter
    positions: object  # sorted flat positions still training, encoded (sara.positions); decoded: .idx
    values: torch.Tensor  # 1-D leaf tensor: the optimizer's param for this weight (a placeholder without copy)
    threshold: float
    initial: torch.Tensor | None  # base values at idx (for ΔW of the nuclear norm); None if not a 2-D weight
    frozen: list = field(default_factory=list)  # encoded positions that trained, then froze (progressive)
    handle: object = None  # the grad hook's removable handle
    version: tuple = ()  # _write_mark of the weight when the values were last in step with it
    payload: torch.Tensor | None = None  # the values' grad the hook put on param.grad (a SelectedGrad)
    stepped: int = -1  # step_in_backward: steps_done when the hook last updated this weight
    grad_buffer: torch.Tensor | None = None  # cuda_graphs: the fixed tensor the hook gathers the gradient into

    @property
    def idx(self) -> torch.Tensor:
        """The positions still training (int32 when possible); with compact positions, decoded now."""
        return self.positions.decode()

    @idx.setter
    def idx(self, idx: torch.Tensor) -> None:
        self.positions = encode_positions(idx, self.positions.numel, self.positions.kind)

    @property
    def count(self) -> int:
        """How many entries still train (without decoding the positions)."""
        return self.positions.count

    @property
    def grad_positions(self):
        """What a :class:`SelectedGrad` holds as its positions: the index tensor itself, or the compact
        encoding (decoded only if the gradient is densified or combined with a dense one)."""
        return self.positions.codes if self.positions.kind == "index" else self.positions

    def trained_positions(self) -> torch.Tensor:
        """Every position that ever trained (what a sparse file must store)."""
        if not self.frozen:
            return self.idx
        return torch.cat([self.idx, *(f.decode() for f in self.frozen)]).sort().values


def _check_number(name, value, *, low=None, low_inclusive=True, allow_none=False, integer=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        raise ConfigError(f"{name} must be {kind}{bound}, got {value!r}")


def _check_betas(betas) -> None:
    # torch would fail later with an IndexError (one number) or train with a nonsense average (beta >= 1)
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    if not ok:
        raise ConfigError(f"betas must be two numbers in [0, 1) (the moments' decay rates, e.g. (0.9, 0.999)), "
                          f"got {betas!r}")


class SaRAAdamW(torch.optim.AdamW):
    """AdamW that trains only the small-|w| entries of ``model``, SaRA-style.

    A real :class:`torch.optim.Optimizer`: LR schedulers, ``clip_grad_norm_``
    over ``param_groups``, ``zero_grad``, ``step`` and ``state_dict`` (for
    resuming) behave as usual. Its params are the 1-D vectors of selected
    values, one per considered weight (empty when nothing is selected there).

    Selection: ``threshold`` (absolute θ, default 2e-3 as the authors) *or*
    ``fraction`` (global quantile, or per weight with ``per_layer=True``);
    ``target_modules`` (names or regexes) and ``layer_types`` (module classes)
    restrict which weights are considered; by default all that require grad
    (a part the user froze with ``requires_grad_(False)`` stays frozen;
    ``include_frozen=True`` considers it too). Attaching freezes every parameter
    of ``model`` except the weights with selected entries; :func:`detach`
    restores the flags.

    Gradients: after ``backward()`` each trained weight's ``.grad`` is a
    :class:`~sara_edu.sara.grad.SelectedGrad` (only the selected entries, no
    dense memory), so ``clip_grad_norm_(model.parameters(), ...)`` clips what
    SaRA trains and ``model.zero_grad()`` clears it, like ``zero_grad()`` here.
    On several processes SaRA averages them itself; ``no_sync()`` marks the
    backward passes that only accumulate (see :mod:`sara_edu.sara.distributed`).
    With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` unscales them
    (unless ``scaler.unscale_(optimizer)`` already did) and skips a step with
    inf/NaN before ``step()`` runs: the nuclear-norm term sees unscaled
    gradients, and a skipped step counts nowhere (``progressive_iter``, the
    nuclear term's choice).

    Clipping bounds the loss gradient only: the nuclear-norm gradient
    ``λ·U·Vᵀ`` (at the mask) is added inside ``step()``, after
    ``clip_grad_norm_`` and after unscaling, and is not clipped. Like AdamW's
    decoupled weight decay it is the optimizer's own regulariser, and it is
    bounded by λ alone (no entry exceeds λ: ``U·Vᵀ`` has spectral norm 1).

    ``rank_lambda``: nuclear-norm weight λ (0 disables it); applied to one
    randomly chosen eligible weight every ``nuclear_every`` steps (seeded
    by ``seed``). Eligible: weights with selected entries, at most
    ``nuclear_max_numel`` entries (None = no limit), and of the kind
    ``nuclear_targets`` names: ``"2d"`` (default: 2-D weights, i.e. linear
    layers), ``"conv"`` (2-D weights and convolutions, reshaped to
    ``out × (in·kh·kw)``), or ``"authors"`` (the authors' release: 2-D weights
    with ``min(shape) > 64``). ``nuclear_of``: the matrix penalised, ``"update"``
    (default: ``ΔW⊙M``, as the paper writes it) or ``"weights"`` (``W⊙M``, as the
    authors' release does; keeps no starting values). ``progressive_iter``: the
    step after which progressive adjustment runs (None = never);
    ``reset_moments=True`` then restarts the continuing entries' AdamW state
    (zero moments, step 0) as the authors' release does, instead of keeping it.
    ``nuclear_via``: ``"adam"`` (default, the authors' release) adds ``λ·U·Vᵀ``
    to the chosen weight's gradient, so AdamW normalises it with the loss
    gradient; ``"direct"`` leaves AdamW and its moments alone and subtracts
    ``lr·λ·U·Vᵀ`` from the values after AdamW's step (a plain subgradient step:
    its size is λ's, whatever the loss gradient beside it).

    Resuming: ``state_dict()`` holds the masks, each weight's θ, the
    starting values of the nuclear-norm term, the moments and the random
    states. A new ``SaRAAdamW`` with the same arguments and ``load_state_dict``
    resume exactly whether the model's trained weights are loaded before the
    optimizer is created, after it, or after its ``load_state_dict``: the
    value copy follows any write into a weight made after SaRA's own (see
    ``_follow_weights``).

    Optimizer state at progressive adjustment: the moments (and step count) of
    the continuing entries are kept (unless ``reset_moments``), those of frozen
    entries are dropped, so continuing entries see no discontinuity in their
    Adam statistics.

    Persistent state per trained entry (the defaults are exact: 16 bytes, i.e. a
    4-byte copy of the value, 8 bytes of fp32 moments, a 4-byte position; plus
    4 bytes of starting value in the eligible weights while ``rank_lambda > 0``
    and ``nuclear_of="update"``):

    * ``value_copy=False``: no copy; each step gathers the values from the
      weight, updates them and scatters them back (-4 bytes; same numbers).
    * ``positions="delta"`` (~1 byte) or ``"bitmask"`` (1 bit per weight
      entry): compact positions, decoded per layer when used
      (:mod:`sara_edu.sara.positions`; same numbers).
    * ``moments="bf16"`` (4 bytes) or ``"8bit"`` (~2 bytes): low-precision
      moments with stochastic rounding (:mod:`sara_edu.sara.moments`; changes
      the numbers slightly, see there).
    * ``compact=True``: all three (``value_copy=False, positions="delta",
      moments="bf16"``) unless given explicitly: ~5.6 bytes per entry.

    Any of them except ``positions`` alone runs its own AdamW step, one layer
    at a time (:mod:`sara_edu.sara.compact_step`), instead of stock
    ``torch.optim.AdamW``, with the same kernel (``fused``: torch's fused
    kernel by default on CPU and CUDA, else torch's single-tensor formula); with
    fp32 moments it is bit for bit the exact path with the same ``fused``.
    :func:`~sara_edu.sara.footprint.state_bytes` counts the bytes actually kept.

    How the step runs (the same numbers; benchmarks/memory_time.py measures them):

    * ``compiled=True``: gather, AdamW and write-back of each weight as one
      ``torch.compile``'d kernel (:mod:`sara_edu.sara.fused_step`); on a CPU
      bit for bit the stock step, compiled once per dtype and device (seconds,
      in the first step); on CUDA Triton kernels, not yet measured on a GPU.
    * ``step_in_backward=True``: each weight is updated inside the backward
      pass, as soon as its gradient exists, so the selected gradients (4 bytes
      per trained entry) are never held, and a large Linear/Conv2d weight's
      dense gradient is made a block of rows at a time (:mod:`.row_grad`).
      The default step's numbers: bit for bit, except that a weight gradient
      made in blocks of rows can round otherwise in its last bits. What
      needs every gradient before any update is refused with a clear error:
      global gradient clipping, ``GradScaler``, gradient accumulation, several
      processes. ``step()`` then only finishes the step (the nuclear-norm term
      of a weight that got no gradient, the step count, progressive adjustment).
    * ``cuda_graphs=True`` (exact state, CUDA): AdamW and the write-back of
      every weight are captured once as a CUDA graph and replayed with one
      launch (:mod:`.cuda_graph`); captured again when progressive adjustment
      or a resume moves the tensors. Keeps each selected gradient in a fixed
      buffer (+4 bytes per trained entry between steps); the numbers are the
      exact step's, the lr read as float32. Off by default: not yet measured
      on a GPU. ``graph_stats`` counts captures, replays and eager steps.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, threshold: float | None = None,
                 fraction: float | None = None, per_layer: bool = False, rank_lambda: float = 5e-4,
                 progressive_iter: int | None = None, nuclear_every: int = 1, target_modules=None,
                 layer_types=None, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0, total_steps: int | None = None, nuclear_method: str = "gram",
                 nuclear_max_numel: int | None = None, fused: bool | None = None,
                 selection: Selection | None = None, include_frozen: bool = False, *, compact: bool = False,
                 value_copy: bool | None = None, positions: str | None = None, moments: str | None = None,
                 nuclear_targets: str = "2d", nuclear_of: str = "update", reset_moments: bool = False,
                 nuclear_via: str = "adam", compiled: bool = False, step_in_backward: bool = False,
                 cuda_graphs: bool = False):
        check_is_model(model, type(self).__name__)
        if threshold is None and fraction is None and selection is None:
            threshold = 2e-3  # the authors' θ for Stable Diffusion 1.5
        _check_number("lr", lr, low=0, low_inclusive=False)
        _check_number("weight_decay", weight_decay, low=0)
        _check_number("eps", eps, low=0, low_inclusive=False)
        _check_betas(betas)
        _check_number("rank_lambda", rank_lambda, low=0)
        _check_number("nuclear_every", nuclear_every, low=1, integer=True)
        _check_number("nuclear_max_numel", nuclear_max_numel, low=1, integer=True, allow_none=True)
        _check_number("total_steps", total_steps, low=1, integer=True, allow_none=True)
        _check_number("progressive_iter", progressive_iter, low=1, integer=True, allow_none=True)
        if progressive_iter is not None and total_steps is not None and progressive_iter >= total_steps:
            raise ConfigError(f"progressive_iter={progressive_iter} is beyond the run (total_steps={total_steps}): "
                              "adjustment would never happen. Use a step inside the run (the authors use half "
                              "of it), or None to disable it.")
        if nuclear_method not in ("gram", "svd"):
            raise ConfigError(f"nuclear_method must be 'gram' or 'svd', got {nuclear_method!r}")
        check_nuclear_options(nuclear_targets, nuclear_of, reset_moments, nuclear_via)
        if selection is None:
            check_selection_args(threshold, fraction, per_layer)
        # -- compact state options (see the class docstring)
        if not isinstance(compact, bool) or not (value_copy is None or isinstance(value_copy, bool)):
            raise ConfigError(f"compact and value_copy must be True or False, got compact={compact!r}, "
                              f"value_copy={value_copy!r}")
        self.value_copy = (not compact) if value_copy is None else value_copy
        self.positions = check_position_kind(positions or ("delta" if compact else "index"))
        self.moments = check_moment_kind(moments or ("bf16" if compact else "fp32"))
        check_compile_option(compiled)
        if not isinstance(step_in_backward, bool):
            raise ConfigError(f"step_in_backward must be True or False, got {step_in_backward!r}")
        if step_in_backward and distributed_run():
            raise ConfigError("step_in_backward=True updates each weight inside its own backward pass, before "
                              "the processes could average its gradient: it runs on one process only. On several "
                              "processes use the default (step_in_backward=False)")
        self.compiled, self.step_in_backward = compiled, step_in_backward
        self._own_step = not self.value_copy or self.moments != "fp32" or compiled or step_in_backward
        check_attachable(model, type(self).__name__)
        check_supported_setup(model, type(self).__name__)

        params = considered_parameters(model, target_modules, layer_types, include_frozen)
        if selection is None:
            selection = select_parameters(model, threshold, fraction, per_layer, target_modules, layer_types,
                                          include_frozen)
        elif [n for n, _ in params] != selection.names or any(
                tuple(p.shape) != tuple(selection.shapes[n]) for n, p in params):
            raise ConfigError("the given selection was made on another model (names or shapes differ)")
        self.selection = selection
        self.rank_lambda = float(rank_lambda)
        self.progressive_iter = progressive_iter
        self.nuclear_every = int(nuclear_every)
        self.nuclear_method = nuclear_method
        self.nuclear_max_numel = nuclear_max_numel
        self.nuclear_targets, self.nuclear_of, self.reset_moments = nuclear_targets, nuclear_of, reset_moments
        self.nuclear_via = nuclear_via
        self._direct_nuclear = None  # (slot, λ·UVᵀ[M]) waiting for the end of the step (nuclear_via="direct")
        self._nuclear_pick = None  # step_in_backward: [slot, updated yet?] of this step's nuclear-norm term
        self.steps_done = 0
        self.detached = False
        self.churn = None  # DataFrame from progressive_adjust
        self.last_nuclear: dict | None = None
        self._rng = random.Random(seed)
        self._model_ref = weakref.ref(model)
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}

        self.slots: list[_Slot] = []
        with torch.no_grad():
            for name, p in params:
                flat_view(p)
                idx = selection.indices[name].to(p.device)
                if self.value_copy:
                    values = flat_view(p).index_select(0, idx).clone().requires_grad_(True)
                else:
                    values = placeholder(idx.numel(), p)
                keeps_start = (self.rank_lambda > 0 and self.nuclear_of == "update"
                               and nuclear_matrix_shape(p.shape, self.nuclear_targets) is not None)
                initial = flat_view(p).index_select(0, idx).clone() if keeps_start else None
                self.slots.append(_Slot(name, p, encode_positions(idx, p.numel(), self.positions), values,
                                        selection.thresholds[name], initial))
        if self.positions != "index":  # keep no 4-byte copy of the positions: decode the slots' on demand
            self.selection = replace(selection, indices=_TrainedPositions(self.slots))
        self.moment_generator = None
        if self.moments != "fp32":  # stochastic rounding, reproducible and resumable
            self.moment_generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
        values = [s.values for s in self.slots]
        if fused is None:  # fused kernels are the fastest AdamW where torch has them (compact_step uses them too)
            fused = all(v.device.type in ("cpu", "cuda") and v.dtype in (torch.float32, torch.float16,
                                                                         torch.bfloat16, torch.float64)
                        for v in values)
        super().__init__(values, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         fused=fused or None, foreach=None if (fused or self._own_step) else True)
        check_graph_option(cuda_graphs, own_step=self._own_step, positions=self.positions,
                           fused=bool(self.param_groups[0]["fused"]), devices=[s.param.device for s in self.slots])
        self.cuda_graphs = cuda_graphs
        self._graphs = StepGraphs(self.slots, self.slots[0].param.device) if cuda_graphs and self.slots else None
        if self._own_step:
            init_state(self)  # the moments now, in one go (see compact_step.init_state)
        # GradScaler must unscale the gradients and skip a step with inf/NaN itself, before step() runs: the
        # fused kernel would unscale only inside the update, after step() added the (unscaled) nuclear-norm
        # gradient, and a skipped step would still draw the nuclear term's weight and count towards
        # progressive_iter (compact_adamw_step reads no grad_scale/found_inf at all)
        self._step_supports_amp_scaling = False
        self._note_versions()
        # the sync object lives on in the weights' hooks: it must not hold the optimizer (nor the model)
        self.sync = GradientSync(self.slots, functools.partial(_fingerprint, self._model_ref, self.slots))
        # Only now touch the model, so a failed construction leaves it as it was.
        model.requires_grad_(False)
        for slot in self.slots:
            if slot.count:
                self._hook(slot)
        self._ddp = None
        if distributed_run():  # DDP may wrap the model: keep it away from SaRA's weights
            self._ddp = DDPCompanion(model, [s.name for s in self.slots if s.count], self.sync)
        mark_attached(model, [s.param for s in self.slots], self)

    def no_sync(self):
        """Context manager: backward passes inside only accumulate (no cross-process averaging yet).

        Not needed when the model is wrapped in DistributedDataParallel: SaRA
        follows ``ddp_model.no_sync()`` (and so ``accelerator.accumulate``).
        """
        return self.sync.no_sync()

    # ---------------------------------------------------------------- gradients
    def _hook(self, slot: _Slot) -> None:
        """Gather the selected entries of the weight's grad; leave only them on ``param.grad``."""
        if self.step_in_backward:
            slot.handle = hook_step(self, slot)
            return
        sync = self.sync  # the hook must not hold the optimizer (a deleted optimizer frees its state)

        def gather(p, slot=slot):
            g = p.grad
            if isinstance(g, SelectedGrad):  # autograd added this pass into it (gradient accumulation)
                if g.positions is not slot.grad_positions:
                    raise ConfigError(f"stale SaRA gradient on {slot.name!r}: call zero_grad() after step()")
                sel = g.values
            else:
                buf = slot.grad_buffer  # cuda_graphs: the graph reads the gradient from this fixed tensor
                if buffer_fits(buf, slot.count, g):
                    sel = torch.index_select(g.reshape(-1), 0, slot.idx, out=buf)
                else:
                    sel = g.reshape(-1).index_select(0, slot.idx)
                # the dense grad dies here
                p.grad = SelectedGrad(p.shape, slot.grad_positions, sel, slot.name, sync.guard)
            slot.values.grad = sel
            slot.payload = sel
            sync.gathered()

        slot.param.requires_grad_(True)
        slot.handle = slot.param.register_post_accumulate_grad_hook(gather)

    def _unhook(self, slot: _Slot) -> None:
        if slot.handle is not None:
            slot.handle.remove()
            slot.handle = None

    @staticmethod
    def _clear_grad(slot: _Slot) -> None:
        slot.values.grad = None
        slot.param.grad = None
        slot.payload = None
        slot.grad_buffer = None  # its size or its graph is gone (progressive adjustment, resume, detach)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear SaRA's gradients: the optimizer's and the ``SelectedGrad`` on each weight."""
        # step_in_backward leaves StepTakenGrad markers, which have nothing to zero: they are always removed
        super().zero_grad(set_to_none=set_to_none or self.step_in_backward)
        for slot in self.slots:
            slot.param.grad = None  # the next backward pass gathers afresh either way
            slot.payload = None

    def _collect_grads(self) -> None:
        """The weights' ``.grad`` is the truth: ``model.zero_grad()`` must clear what ``step()`` uses."""
        for slot in self.slots:
            g = slot.param.grad
            if isinstance(g, SelectedGrad):
                slot.values.grad = g.values
            elif g is None:
                if slot.payload is not None and slot.values.grad is slot.payload:  # cleared through the model
                    slot.values.grad = None
                slot.payload = None
            elif slot.count:  # a dense grad put there by hand: take its selected entries
                slot.values.grad = g.reshape(-1).index_select(0, slot.idx)
                slot.param.grad = None

    def _delta(self, slot: _Slot) -> torch.Tensor:
        """The penalised matrix, dense (one layer, transient): ΔW⊙M, or W⊙M with ``nuclear_of="weights"``."""
        self._follow_weights([slot])
        d = torch.zeros(slot.param.numel(), dtype=slot.values.dtype, device=slot.values.device)
        values = current_values(slot, self.value_copy)
        d[slot.idx] = values if self.nuclear_of == "weights" else values - slot.initial
        return d.view(nuclear_matrix_shape(slot.param.shape, self.nuclear_targets))

    def eligible_for_nuclear(self) -> list[_Slot]:
        """Weights of the ``nuclear_targets`` kind with trainable entries (and within ``nuclear_max_numel``)."""
        return [s for s in self.slots if s.count > 0
                and nuclear_matrix_shape(s.param.shape, self.nuclear_targets) is not None
                and (self.nuclear_of == "weights" or s.initial is not None)
                and (self.nuclear_max_numel is None or s.param.numel() <= self.nuclear_max_numel)]

    def _nuclear_grad(self, slot: _Slot) -> torch.Tensor:
        """λ·UVᵀ at the slot's trained positions (and the term's value, for ``last_nuclear``)."""
        g, nuc = nuclear_norm_grad_at(self._delta(slot), slot.idx, self.nuclear_method)
        self.last_nuclear = {"step": self.steps_done + 1, "name": slot.name, "nuclear_norm": nuc,
                             "penalty": self.rank_lambda * nuc}
        return g.mul_(self.rank_lambda)

    def _add_nuclear_grad(self) -> None:
        eligible = self.eligible_for_nuclear()
        if not eligible:
            return
        slot = self._rng.choice(eligible)
        g = self._nuclear_grad(slot)
        if self.nuclear_via == "direct":
            self._direct_nuclear = (slot, g)
        elif slot.values.grad is None:
            slot.values.grad = g
        else:
            slot.values.grad.add_(g)

    # ---------------------------------------------------------------- the step
    def step(self, closure=None):
        """Nuclear-norm grad → stock AdamW on the values → scatter into the weights."""
        if self.detached:
            raise ConfigError("this SaRA optimizer was detached from its model; create a new one to keep training")
        check_runtime(self._model_ref(), self.slots)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            finish_step(self)
            return loss
        self.sync.finish()  # the last backward passes ran inside no_sync(): average them now
        self._collect_grads()
        self._follow_weights()
        with torch.no_grad():
            if self.rank_lambda > 0 and self.steps_done % self.nuclear_every == 0:
                self._add_nuclear_grad()
        if self._own_step:  # compact state: AdamW written out, gather/update/scatter per layer
            compact_adamw_step(self)
        elif self._graphs is None or not self._graphs.step(self):  # a CUDA graph replayed, or the stock kernels
            adamw_update(self)
            with torch.no_grad():
                for slot in self.slots:
                    if slot.values.grad is not None:  # AdamW left grad-less values (and weights) untouched
                        write_values(flat_view(slot.param), slot.positions, slot.values.detach())
        if self._direct_nuclear is not None:
            self._step_nuclear_directly(*self._direct_nuclear)
        self._note_versions()
        self._count_step()
        return loss

    def _group_of(self, slot: _Slot) -> dict:
        """The param group that holds ``slot``'s values (its lr, betas, weight decay)."""
        return next(group for group in self.param_groups if any(v is slot.values for v in group["params"]))

    def _count_step(self) -> None:
        self.steps_done += 1
        if self.progressive_iter is not None and self.steps_done == self.progressive_iter:
            self.progressive_adjust()

    def _nuclear_options(self) -> dict:
        """The nuclear-norm options as the optimizer state stores them (keys of :data:`NUCLEAR_OPTIONS`)."""
        return {key: getattr(self, attribute) for key, attribute in NUCLEAR_OPTIONS.items()}

    @torch.no_grad()
    def _step_nuclear_directly(self, slot: _Slot, g: torch.Tensor) -> None:
        """``nuclear_via="direct"``: values -= lr·λ·UVᵀ[M] after AdamW's step, into the copy and the weight."""
        self._direct_nuclear = None
        lr = self._group_of(slot)["lr"]
        new = current_values(slot, self.value_copy) - lr * g.to(slot.values.dtype)
        if self.value_copy:
            slot.values.copy_(new)
        write_values(flat_view(slot.param), slot.positions, new.to(slot.param.dtype))

    def progressive_adjust(self):
        """Run progressive adjustment now (see :func:`~sara_edu.sara.progressive.progressive_adjust`)."""
        self._follow_weights()
        if self._graphs is not None:
            self._graphs.clear()  # the trained entries shrink: every tensor a graph touches moves
        if not isinstance(self.selection.indices, _TrainedPositions):
            # from now on the positions that trained are the slots' (still training + frozen); the selection's
            # own copy of the first positions would keep a second 4 bytes per trained entry alive all run
            self.selection = replace(self.selection, indices=_TrainedPositions(self.slots))
        self.churn = progressive_adjust(self)
        return self.churn

    # ---------------------------------------------------------------- the weights are the truth
    def _follow_weights(self, slots=None) -> None:
        """Re-gather the value copy of every weight written since SaRA last wrote it.

        The exact path trains a copy of the selected values and writes it into
        the weight after each step; a write by anyone else (``model.load_state_dict``
        after attaching, e.g. to resume, or any in-place change) would be
        overwritten at the next step. Every in-place write bumps a tensor's
        ``_version`` (and ``p.data = t`` moves its storage): where either moved
        since SaRA's own write, the weight wins. A write through ``p.data``
        (``p.data.copy_(t)``) bypasses the counter and is not seen: write under
        ``torch.no_grad()`` instead, as ``load_state_dict`` does.
        """
        if not self.value_copy:  # nothing to follow: the values live only in the weight
            return
        with torch.no_grad():
            for slot in self.slots if slots is None else slots:
                if slot.count and _write_mark(slot.param) != slot.version:
                    slot.values.copy_(flat_view(slot.param).index_select(0, slot.idx))
                    slot.version = _write_mark(slot.param)

    def _note_versions(self, slots=None) -> None:
        """After SaRA's own write into the weights: the copy and the weights agree."""
        for slot in self.slots if slots is None else slots:
            slot.version = _write_mark(slot.param)

    # ---------------------------------------------------------------- reporting
    @property
    def graph_stats(self) -> dict | None:
        """``cuda_graphs=True``: steps that captured a graph, replayed one, ran eagerly (None without graphs)."""
        return None if self._graphs is None else dict(self._graphs.stats)

    @property
    def num_trainable(self) -> int:
        """How many entries train now (after progressive adjustment, fewer)."""
        return sum(s.count for s in self.slots)

    def report(self):
        """Selection per weight (name, shape, numel, selected, fraction, threshold) + ``trainable`` now."""
        df = self.selection.report()
        now = {s.name: s.count for s in self.slots}
        df["trainable"] = [now.get(n, self.num_trainable) for n in df.name]
        return df

    # ---------------------------------------------------------------- resume
    def state_dict(self):
        sd = super().state_dict()
        sd["sara"] = {
            "names": [s.name for s in self.slots],
            "idx": [s.idx.cpu() for s in self.slots],
            "frozen": [[f.decode().cpu() for f in s.frozen] for s in self.slots],
            "initial": [None if s.initial is None else s.initial.cpu() for s in self.slots],
            # θ per weight: a new optimizer computes it from the weights it is given, which are the trained
            # ones when resuming, and a fraction's quantile moves with them (progressive adjustment uses θ)
            "thresholds": [s.threshold for s in self.slots],
            "selection_extra": dict(self.selection.extra),
            "nuclear": self._nuclear_options(),
            "steps_done": self.steps_done, "rng": self._rng.getstate(),
            "moment_rng": None if self.moment_generator is None else self.moment_generator.get_state(),
        }
        return sd

    def load_state_dict(self, state_dict):
        """Resume: restores the masks and thresholds (which the trained weights no longer imply) and the moments.

        The values are taken from the weights as they are now, and followed
        if the weights are written later: any order of loading the model's
        and the optimizer's state resumes exactly.
        """
        state_dict = dict(state_dict)
        sara = state_dict.pop("sara", None)
        if sara is None:
            raise CheckpointError("this optimizer state was not saved by SaRAAdamW (no 'sara' entry)")
        if sara["names"] != [s.name for s in self.slots]:
            raise CheckpointError("this SaRA optimizer state belongs to a model with other weights "
                                  "(the considered parameter names differ)")
        saved = {**NUCLEAR_DEFAULTS, **sara.get("nuclear", {})}  # older checkpoints: the options' defaults
        mine = self._nuclear_options()
        if saved != mine:
            diff = ", ".join(f"{NUCLEAR_OPTIONS[k]}={saved.get(k)!r}" for k in mine if saved.get(k) != mine[k])
            raise CheckpointError(f"this SaRA optimizer state was saved with {diff}, and this optimizer was "
                                  "other ones: create it with the checkpoint's options to resume")
        thresholds = sara.get("thresholds")  # absent from checkpoints saved before θ was stored
        if thresholds is not None and len(thresholds) != len(self.slots):
            raise CheckpointError(f"this SaRA optimizer state holds {len(thresholds)} thresholds for "
                                  f"{len(self.slots)} weights: it is damaged")
        with torch.no_grad():
            for i, (slot, idx, frozen, initial) in enumerate(zip(self.slots, sara["idx"], sara["frozen"],
                                                                 sara["initial"])):
                dev = slot.param.device
                if thresholds is not None:
                    slot.threshold = float(thresholds[i])
                slot.idx = idx.to(dev)
                slot.frozen = [encode_positions(f.to(dev), slot.param.numel(), self.positions) for f in frozen]
                self._clear_grad(slot)
                if self.value_copy:
                    slot.values.data = flat_view(slot.param).index_select(0, slot.idx).clone()
                else:
                    slot.values.data = placeholder_data(slot.count, slot.values)
                slot.initial = None if initial is None else initial.to(dev, slot.param.dtype)
                self._unhook(slot)
                if slot.count:
                    self._hook(slot)
                else:
                    slot.param.requires_grad_(False)
        self._note_versions()
        # the selection is the restored one: every position that trained, each weight's θ
        self.selection = replace(self.selection, indices=_TrainedPositions(self.slots),
                                 thresholds={s.name: s.threshold for s in self.slots},
                                 extra=dict(sara.get("selection_extra", self.selection.extra)))
        if self._graphs is not None:
            self._graphs.clear()
        if self._ddp is not None:
            self._ddp.keep_anchor()  # the loop above may have frozen it
        self.steps_done = sara["steps_done"]
        self._rng.setstate(_as_rng_state(sara["rng"]))
        if self.moment_generator is not None and sara.get("moment_rng") is not None:
            self.moment_generator.set_state(sara["moment_rng"])
        self._load_optimizer_state(state_dict)

    def _load_optimizer_state(self, state_dict):
        """torch's load, except that moments saved in (or for) a compact format are converted, not cast."""
        if not self._own_step and not any(moment_kind(st) not in (None, "fp32")
                                          for st in state_dict["state"].values()):
            super().load_state_dict(state_dict)  # the exact path: unchanged
            return
        # torch would cast every floating state tensor to the param's dtype (fp32): take the moments out
        held, rest = {}, {}
        for pid, st in state_dict["state"].items():
            held[pid] = {k: v for k, v in st.items() if k != "step"}
            rest[pid] = {k: v for k, v in st.items() if k == "step"}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if held.get(pid):
                st = self.state[p]
                st.update({k: v.to(p.device) for k, v in held[pid].items()})
                convert_moments(st, self.moments)

    # ---------------------------------------------------------------- detaching
    def detach(self, requires_grad: bool | None = None) -> nn.Module | None:
        """Remove every hook and mark; the model becomes a plain model with the trained weights.

        ``requires_grad=None`` restores the flags the parameters had before
        attaching; ``True``/``False`` sets them all.
        """
        for slot in self.slots:
            self._unhook(slot)
            self._clear_grad(slot)
            slot.values.data = slot.values.data[:0]  # free the trainable copy; the weights hold the values
            slot.initial = None
        if self._graphs is not None:
            self._graphs.clear()
        if self._ddp is not None:
            self._ddp.remove()
            self._ddp = None
        return release_model(self, [s.param for s in self.slots], requires_grad)

    # ---------------------------------------------------------------- saving
    def trained_entries(self) -> dict[str, torch.Tensor]:
        """name -> every flat position that trained (progressively frozen ones included)."""
        return {s.name: s.trained_positions() for s in self.slots}

    @property
    def model(self) -> nn.Module:
        return attached_model(self)

    def config(self) -> dict:
        sel = self.selection
        return {"method": "sara", "mode": sel.mode, "requested": sel.requested, "rank_lambda": self.rank_lambda,
                "nuclear_targets": self.nuclear_targets, "nuclear_of": self.nuclear_of,
                "reset_moments": self.reset_moments, "nuclear_via": self.nuclear_via,
                "progressive_iter": self.progressive_iter, "steps_done": self.steps_done,
                "state": {"value_copy": self.value_copy, "positions": self.positions, "moments": self.moments}}


class _TrainedPositions(Mapping):
    """``Selection.indices`` of a compact optimizer: every position that ever trained, decoded on access.

    Nothing new joins the trainable set, so this is the selection it was built from.
    """

    def __init__(self, slots):
        self._slots = {s.name: s for s in slots}

    def __getitem__(self, name):
        return self._slots[name].trained_positions()

    def __iter__(self):
        return iter(self._slots)

    def __len__(self):
        return len(self._slots)


def _write_mark(p: torch.Tensor) -> tuple:
    """What changes when a weight is written: its in-place write counter, and its storage if ``.data`` was set."""
    return p._version, p.data_ptr()


def _fingerprint(model_ref, slots) -> torch.Tensor:
    """Per parameter of the model its float64 sum, then each weight's selected count (ranks must agree)."""
    model = model_ref()
    sums = [torch.sum(p.detach(), dtype=torch.float64) for p in model.parameters()] if model is not None else []
    counts = [torch.tensor(float(s.count), dtype=torch.float64) for s in slots]
    return torch.stack([t.cpu() for t in sums] + counts)


def adamw_update(optimizer: torch.optim.AdamW, closure=None):
    """Run stock ``torch.optim.AdamW.step`` on ``optimizer`` without re-running step hooks.

    torch wraps every optimizer class's ``step`` so that step pre/post hooks run
    around it; calling ``super().step()`` from our own (already wrapped) ``step``
    would run them twice. The hook wrapper marks itself ``hooked``; we call what
    it wraps (the real update, with its grad-mode handling).
    """
    fn = torch.optim.AdamW.step
    if getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return fn(optimizer, closure)


#: Which weights the nuclear-norm term may pick (``nuclear_targets``) and what it penalises (``nuclear_of``).
NUCLEAR_TARGETS = ("2d", "conv", "authors")
NUCLEAR_OF = ("update", "weights")
#: How the term reaches the values: through AdamW with the loss gradient, or as its own plain step.
NUCLEAR_VIA = ("adam", "direct")
#: The options a resume must match: key in the saved state -> argument (and attribute) name, and their defaults
#: (what a checkpoint saved before an option existed was made with).
NUCLEAR_OPTIONS = {"targets": "nuclear_targets", "of": "nuclear_of", "reset_moments": "reset_moments",
                   "via": "nuclear_via"}
NUCLEAR_DEFAULTS = {"targets": "2d", "of": "update", "reset_moments": False, "via": "adam"}
#: The authors' filter (``len(shape) == 2 and min(shape) > 64`` in their optim/adamw.py).
AUTHORS_MIN_SIDE = 64


def check_nuclear_options(targets, of, reset_moments, via="adam") -> None:
    if targets not in NUCLEAR_TARGETS:
        raise ConfigError(f"nuclear_targets must be one of {NUCLEAR_TARGETS} (2-D weights; also convolutions, "
                          f"reshaped; the authors' min(shape) > {AUTHORS_MIN_SIDE} filter), got {targets!r}")
    if of not in NUCLEAR_OF:
        raise ConfigError(f"nuclear_of must be 'update' (ΔW⊙M, the paper) or 'weights' (W⊙M, the authors' "
                          f"release), got {of!r}")
    if not isinstance(reset_moments, bool):
        raise ConfigError(f"reset_moments must be True or False, got {reset_moments!r}")
    if via not in NUCLEAR_VIA:
        raise ConfigError(f"nuclear_via must be 'adam' (added to the gradient, normalised by AdamW: the authors' "
                          f"release) or 'direct' (its own step of lr·λ·U·Vᵀ after AdamW's), got {via!r}")


def nuclear_matrix_shape(shape, targets: str) -> tuple[int, int] | None:
    """The matrix the nuclear-norm term sees for a weight of ``shape``, or None if it is not a target.

    A convolution ``out × in × kh × kw`` is read as ``out × (in·kh·kw)`` (a view:
    the same flat order), the usual matrix of a convolution.
    """
    shape = tuple(shape)
    if len(shape) == 2:
        matrix = shape
        if targets == "authors" and min(shape) <= AUTHORS_MIN_SIDE:
            return None
    elif targets == "conv" and len(shape) == 4:
        matrix = (shape[0], shape[1] * shape[2] * shape[3])
    else:
        return None
    return matrix if min(matrix) > 1 else None


def _as_rng_state(state):
    """``random.Random.getstate()`` survives torch.save as lists; setstate wants tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
