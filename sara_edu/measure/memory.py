"""How much memory and time does fine-tuning cost? Exact answers, also on a CPU.

On CUDA the caching allocator already counts every byte
(``torch.cuda.max_memory_allocated``). On a CPU there is no such counter, so
:class:`MemoryTracker` builds one: a ``TorchDispatchMode`` sees every aten
operation (forward, the autograd engine's backward, the optimizer's update),
and for each tensor an operation *creates* it records the bytes of the
tensor's storage once. A weak reference on the storage subtracts them again
the moment the storage is freed. Views share their base's storage, so they are
never counted twice; in-place ops create nothing. What it cannot see: scratch
buffers a single kernel allocates and frees internally, and tensors made
outside torch's dispatcher (``torch.from_numpy``, loading files). Those are
small next to weights, gradients and activations.

The breakdown (:meth:`MemoryTracker.report`) splits the peak into what the
course compares between methods:

* **frozen weights**: model parameters and buffers the optimizer does not
  update (they are there whatever the method; *not* part of the peak above frozen);
* **trainable values**: what the optimizer updates (the whole UNet for full
  fine-tuning, the adapter for LoRA, a 1-D vector of selected values for SaRA);
* **optimizer state**: AdamW's two moments (+ a step counter per tensor);
* **gradients**: the ``.grad`` of the trainable values;
* **method buffers**: other tensors the method keeps (e.g. SaRA's indices);
* **activations + transients**: everything else live at the peak, i.e. the
  peak minus the categories above *that were live at the moment of the peak*.

``peak_above_frozen`` = the tracked peak + the weights that existed before the
block and are trained (full fine-tuning trains the model's own weights).

To know what was live at the peak, every allocation and free gets a sequence
number and the peak remembers its number. Tensors are classified while they
exist: just before every optimizer step (:meth:`MemoryTracker.watch`, or
:meth:`MemoryTracker.watching` around a training method) and at the end
(:meth:`MemoryTracker.report`). A classified tensor counts in its category if
it was allocated before, and freed after, the peak. Typical use::

    tracker = MemoryTracker(model=pipe.unet)
    with tracker:
        train(pipe, data, tracker.watching(SaRA()), steps=2, memory_tracker=tracker)
    print(tracker.report(pipe.unet))
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError

MB = 2**20


# Categories, in the order they are stacked in plots.
CATEGORIES = ("trainable_values", "optimizer_state", "gradients", "method_buffers", "activations_transients")
#: What tables, legends and axes call each category.
CATEGORY_LABELS = {c: c.replace("_", " ") for c in CATEGORIES} | {"activations_transients": "activations + transients"}


# ``torch.tensor(data)`` allocates below the dispatcher and then calls lift_fresh on
# the brand-new tensor: its output aliases its input but is a genuinely new storage.
_FRESH_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


def _storage(t: torch.Tensor):
    """The untyped storage of ``t``, or None for tensors without one (meta, sparse, subclasses)."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _storage_key(t: torch.Tensor):
    s = _storage(t)
    return None if s is None else s._cdata


class _AllocationSpy(TorchDispatchMode):
    """Runs every op unchanged and tells the tracker about the storages it created."""

    def __init__(self, tracker: "MemoryTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracker._note_outputs(func, out, args, kwargs)
        return out


@dataclass
class MemoryReport:
    """Peak memory of a fine-tuning run, split by what the bytes are for (all in bytes)."""

    peak_above_frozen: int
    frozen_weights: int
    trainable_values: int
    optimizer_state: int
    gradients: int
    method_buffers: int
    activations_transients: int

    def as_mb(self) -> dict[str, float]:
        return {k: v / MB for k, v in asdict(self).items()}

    def __str__(self):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.as_mb().items())
        return f"MemoryReport(MB: {parts})"


class MemoryTracker:
    """Count the bytes of live tensors created inside a ``with`` block; remember the peak.

    Use it around "attach the method + N training steps"::

        with MemoryTracker() as tracker:
            history = train(pipe, data, method, steps=3, memory_tracker=tracker)
        print(tracker.peak_bytes / 2**20, "MB above what existed before")

    ``peak_bytes``/``current_bytes`` count only tensors created since the block
    started (the model that existed before is not in them). On CUDA ``peak_bytes``
    is the allocator's ``max_memory_allocated`` above the starting level; on a CPU
    it is the exact count described in the module docstring.

    ``model`` (optional) is the model that exists before tracking starts: its
    weights are remembered as pre-existing, so that tensors created after
    :meth:`stop` are never mistaken for them in :meth:`report`.
    """

    def __init__(self, device=None, model: nn.Module | None = None):
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = torch.device(device if device is not None else "cpu")
        self._model = model
        self._live: dict[int, tuple[weakref.ref, int, int]] = {}  # key -> (ref, nbytes, alloc_seq)
        self._tags: dict[int, str] = {}  # storage key -> category, for tensors classified so far
        self._tag_log: list[tuple[str, int, int, int]] = []  # (category, nbytes, alloc, free) of freed tagged storages
        self._preexisting: set[int] | None = None
        self._hooks = []
        self.optimizer = None  # the last optimizer passed to watch()
        self._spy = None
        self._seq = 0
        self._current = 0
        self._peak = 0
        self._peak_seq = 0
        self._cuda_base = 0
        self.active = False
        self._started = False

    # ----------------------------------------------------------------- context
    def __enter__(self) -> "MemoryTracker":
        if self._started:
            raise ConfigError("a MemoryTracker measures one block only; use a new one for a new measurement")
        self._started = True
        if self._model is not None:
            self._preexisting = {k for k in map(_storage_key, _model_tensors(self._model)) if k is not None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._spy = _AllocationSpy(self)
        self._spy.__enter__()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self) -> None:
        """Stop counting new tensors now (idempotent). Frees are still subtracted.

        Useful from a training callback: track attach + the first steps, then let
        the remaining steps run at full speed for timing.
        """
        if not self.active:
            return
        self.active = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda_peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_base
        self._spy.__exit__(None, None, None)
        self._spy = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def stop_after(self, steps: int):
        """A ``train(callback=...)`` that calls :meth:`stop` after ``steps`` optimizer steps: the attach and the
        first steps are counted (by then the optimizer state exists), the later steps run untracked and can be timed."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"steps must be a positive integer (the steps to track), got {steps!r}")

        def stop_tracking(step, pipe, optimizer):
            if step == steps:
                self.stop()

        return stop_tracking

    # --------------------------------------------------------------- counting
    @property
    def peak_bytes(self) -> int:
        """Highest total of bytes alive at once above the start of the block.

        CPU: the exact tensor count (:attr:`tensor_peak_bytes`). CUDA: the caching
        allocator's ``max_memory_allocated`` above its level at the start (it also
        sees kernels' workspaces). Note that :func:`~sara_edu.training.train` resets
        the allocator's peak at every step, so on CUDA inside ``train`` this is the
        current step's peak; :attr:`tensor_peak_bytes` is never reset.
        """
        if self.device.type == "cuda":
            if self.active:
                return torch.cuda.max_memory_allocated(self.device) - self._cuda_base
            return getattr(self, "_cuda_peak", 0)
        return self._peak

    @property
    def tensor_peak_bytes(self) -> int:
        """The exact peak of live tensor bytes created in the block, on any device."""
        return self._peak

    @property
    def current_bytes(self) -> int:
        """Bytes of tensors created inside the block that are still alive."""
        return self._current

    def _note_outputs(self, func, out, args, kwargs):
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return
        inputs = None
        for t in outputs:
            s = _storage(t)
            if s is None or s.device.type != self.device.type:  # e.g. CPU step counters of a CUDA run
                continue
            key = s._cdata
            if key in self._live:
                ref, nbytes, seq = self._live[key]
                if s.nbytes() != nbytes:  # resize_ or an out= op grew/shrank a tracked storage
                    self._live[key] = (ref, s.nbytes(), seq)
                    self._add(s.nbytes() - nbytes)
                continue
            if func not in _FRESH_OPS:
                if inputs is None:  # only computed when needed: most ops' outputs are new
                    inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
                if key in inputs:  # a view of / in-place on a tensor that existed already
                    continue
            self._track(s)

    def _track(self, storage):
        key, nbytes = storage._cdata, storage.nbytes()
        ref = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self._seq += 1
        self._live[key] = (ref, nbytes, self._seq)
        self._add(nbytes)

    def _add(self, nbytes):
        self._current += nbytes
        if self._current > self._peak:
            self._peak = self._current
            self._peak_seq = self._seq

    def _free(self, key):
        entry = self._live.pop(key, None)
        if entry is None:
            return
        _, nbytes, alloc_seq = entry
        self._seq += 1
        self._current -= nbytes
        category = self._tags.pop(key, None)
        if category is not None:
            self._tag_log.append((category, nbytes, alloc_seq, self._seq))

    # ------------------------------------------------------------- categories
    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Classify what the optimizer uses, just before each ``step()``: its values, gradients and state.

        Gradients are freed by ``zero_grad(set_to_none=True)`` before anyone could
        look at them, so they must be recognised while they exist; just before
        ``step()`` all of them do, however they were made (autograd, or a hook
        that gathers a sparse gradient like SaRA's). Values and state are
        classified then too, so that tensors a method later *replaces* (SaRA's
        progressive re-selection shrinks its vectors) still count in their
        category for the time they were alive.

        Call it right after the optimizer is built (:meth:`watching` does): what
        the tracker has seen until then was made by attaching the method, so
        anything not trained or optimizer state is the method's bookkeeping.
        """
        self.optimizer = optimizer
        # Called right after the method was attached, everything created so far is the
        # method's: trainable values, state, and bookkeeping (selection masks, positions).
        trainable, state = _optimizer_tensors(optimizer)
        self.classify(trainable, "trainable_values")
        self.classify(state, "optimizer_state")
        for key in self._live:
            self._tags.setdefault(key, "method_buffers")

        def classify_before_step(opt, args, kwargs):
            trainable, state = _optimizer_tensors(opt)
            for p in trainable:
                self._tag(p.grad, "gradients")
                self._tag(p, "trainable_values")
            for t in state:
                self._tag(t, "optimizer_state")

        self._hooks.append(optimizer.register_step_pre_hook(classify_before_step))

    def watching(self, method):
        """Wrap a :class:`~sara_edu.training.TrainingMethod` so its optimizer is watched from the first step.

        ``train(pipe, data, tracker.watching(SaRA()), memory_tracker=tracker)``
        then ``tracker.report(pipe.unet)``: the tracker keeps the optimizer.
        """
        return _Watched(method, self)

    def classify(self, tensors, category: str) -> None:
        """Put tensors created in the block into ``category`` (one of :data:`CATEGORIES`).

        For what :meth:`watch` and :meth:`snapshot` cannot recognise, e.g. dense
        gradients that no optimizer holds.
        """
        if category not in CATEGORIES + ("frozen_weights",):
            raise ConfigError(f"unknown memory category {category!r}; use one of {CATEGORIES}")
        for t in tensors:
            self._tag(t, category)

    def _tag(self, t, category):
        if t is None:
            return
        key = _storage_key(t)
        if key is not None and key in self._live:
            self._tags.setdefault(key, category)

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Classify the tensors alive now: trainable values, optimizer state, frozen weights.

        Call it after each tracked step (e.g. from ``train(callback=...)``) if the
        method may replace its tensors during training (SaRA's progressive
        re-selection); :meth:`report` calls it once more itself.
        """
        trainable, state = _optimizer_tensors(optimizer)
        for t in trainable:
            self._tag(t, "trainable_values")
        for t in state:
            self._tag(t, "optimizer_state")
        for t in _model_tensors(model):  # model weights created in the block but not trained
            self._tag(t, "frozen_weights")

    def live_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes per category of the tensors created in the block that are alive *now*.

        Called between steps (e.g. from a training callback after step 1), the
        trainable values, optimizer state and method buffers are what the method
        keeps from step to step: its persistent state, without the batch or
        other leftovers of the step (those are not classified).
        """
        self.snapshot(model, optimizer if optimizer is not None else self.optimizer)
        out = dict.fromkeys(CATEGORIES + ("frozen_weights",), 0)
        for key, category in self._tags.items():
            if key in self._live:
                out[category] += self._live[key][1]
        return out

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
        """Split the peak into categories (see the module docstring).

        Call it after the tracked steps, while the optimizer still holds the
        tensors it trains; right after ``train`` returns is best (the last step's
        temporaries are gone by then, so whatever else is still alive is the
        method's own bookkeeping).
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        self.snapshot(model, optimizer)
        for key in self._live:  # still alive, not a weight, not optimizer state: the method keeps it
            self._tags.setdefault(key, "method_buffers")
        # 1) tensors created in the block: classified, and live at the peak?
        new = dict.fromkeys(CATEGORIES + ("frozen_weights",), 0)
        for category, nbytes, alloc, free in self._tag_log:
            if alloc <= self._peak_seq < free:
                new[category] += nbytes
        for key, category in self._tags.items():
            _, nbytes, alloc = self._live[key]
            if alloc <= self._peak_seq:
                new[category] += nbytes
        new["activations_transients"] = max(self.tensor_peak_bytes - sum(new.values()), 0)
        # 2) tensors that existed before the block (not in peak_bytes): the model's
        # weights; for full fine-tuning those weights are the trainable values.
        trainable, state = _optimizer_tensors(optimizer)
        trainable_keys = {k for k in map(_storage_key, trainable) if k is not None}
        old_trainable = tensor_bytes([t for t in trainable if self._untracked_old(t)])
        old_state = tensor_bytes([t for t in state if self._untracked_old(t)])
        frozen_bytes = tensor_bytes([t for t in _model_tensors(model) if _storage_key(t) not in trainable_keys])
        new_frozen = new.pop("frozen_weights")
        new["trainable_values"] += old_trainable
        new["optimizer_state"] += old_state
        return MemoryReport(peak_above_frozen=self.tensor_peak_bytes - new_frozen + old_trainable + old_state,
                            frozen_weights=frozen_bytes, **new)

    def _untracked_old(self, t) -> bool:
        """True for tensors that existed before tracking started (and so are not in the counts)."""
        key = _storage_key(t)
        if key is None or key in self._live or key in self._tags:
            return False
        return self._preexisting is None or key in self._preexisting


class _Watched:
    """A training method whose optimizer a tracker watches (see :meth:`MemoryTracker.watching`)."""

    def __init__(self, method, tracker):
        self.method, self.tracker = method, tracker
        self.name = method.name

    def build_optimizer(self, unet, **kwargs):
        optimizer = self.method.build_optimizer(unet, **kwargs)
        if self.tracker.active:
            self.tracker.watch(optimizer)
        return optimizer

    def trainable_parameters(self, unet):
        return self.method.trainable_parameters(unet)

    def __getattr__(self, name):  # anything else: the wrapped method's
        return getattr(self.method, name)


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers())]


def _optimizer_tensors(optimizer):
    if optimizer is None:
        return [], []
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return trainable, state


def _unique_nbytes(tensors) -> list[int]:
    """Bytes of each distinct storage among ``tensors`` (views and shared weights once)."""
    seen = {}
    for t in tensors:
        s = _storage(t)
        if s is not None:
            seen[s._cdata] = s.nbytes()
    return list(seen.values())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an analytic reference for tests/notebooks)."""
    return sum(_unique_nbytes(tensors))


# ----------------------------------------------------------------- display
def memory_table(reports):
    """Long table (method, category, MB), ready for a seaborn stacked bar.

    ``reports``: ``{method: MemoryReport}``, or the wide table that
    ``benchmarks/memory_time.py`` prints and saves as CSV (columns
    ``"trainable values (MB)"`` ...; ``model`` is kept if present).
    """
    import pandas as pd

    if isinstance(reports, pd.DataFrame):
        columns = {f"{CATEGORY_LABELS[c]} (MB)": c for c in CATEGORIES}
        keep = [c for c in ("model", "method") if c in reports]
        long = reports.melt(id_vars=keep, value_vars=[c for c in columns if c in reports],
                            var_name="category", value_name="MB")
        long["category"] = long["category"].map(lambda c: CATEGORY_LABELS[columns[c]])
        return long.dropna(subset=["MB"])
    rows = [{"method": name, "category": CATEGORY_LABELS[c], "MB": getattr(r, c) / MB}
            for name, r in reports.items() for c in CATEGORIES]
    return pd.DataFrame(rows)


def plot_memory_breakdown(reports, ax=None, title="Peak memory above the frozen weights"):
    """Stacked bar per method: what the peak above the frozen weights is made of."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = memory_table(reports)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * table["method"].nunique() + 3, 4))
    sns.histplot(table, x="method", weights="MB", hue="category", multiple="stack", discrete=True,
                 shrink=0.7, ax=ax, hue_order=[CATEGORY_LABELS[c] for c in CATEGORIES])
    ax.set_ylabel("MB")
    ax.set_xlabel("")
    ax.set_title(title)
    return ax
