"""Notebook 04, training the comparison: each method on its own copy of the same model, the same budget,
and what each one cost (memory, time, trained values, file)."""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ...colours import method_colour
from ...errors import ConfigError
from ...measure.memory import MB, MemoryReport, MemoryTracker
from ...training.loop import pick_device
from ...training.method import FullFineTuning, TrainingMethod

#: The methods of notebook 04, in the order they are shown.
DEFAULT_METHODS = ("SaRA", "LoRA", "full fine-tuning")
REFERENCE = "pretrained"
_ALIASES = {"sara": "SaRA", "lora": "LoRA", "full": "full fine-tuning", "full fine-tuning": "full fine-tuning",
            "fullfinetuning": "full fine-tuning", "full-fine-tuning": "full fine-tuning"}
#: The study's controls that separate where a method trains from how (``reports/controls.md``), by the
#: name a notebook gives them -> the study's method key; :func:`make_method` builds them as the study does.
CONTROL_METHODS = {"SaRA on attention": "sara_attention", "LoRA everywhere": "lora_everywhere",
                   "full FT of attention": "full_attention", "LoRA r=4": "lora_r4"}
_ALIASES.update({k.lower(): k for k in CONTROL_METHODS} | {v: k for k, v in CONTROL_METHODS.items()})
# One colour per method in every figure of the course and the study (sara_edu.colours).
COLOURS = {name: method_colour(name) for name in (REFERENCE, "SaRA", "LoRA", "full fine-tuning", "selective (no UB)",
                                                  *CONTROL_METHODS)}


# ------------------------------------------------------------------ methods

def canonical_method_name(name: str) -> str:
    """``"sara"`` -> ``"SaRA"``, ``"lora"`` -> ``"LoRA"``, ``"full"`` -> ``"full fine-tuning"``."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ConfigError(f"unknown method {name!r}; use one of {[*DEFAULT_METHODS, *CONTROL_METHODS]} "
                          "(or pass your own TrainingMethod objects in a dict {name: method})")
    return _ALIASES[key]


def make_method(name: str, unet, *, fraction: float = 0.1, lora_rank: int | None = None) -> TrainingMethod:
    """The course's SaRA, LoRA or full fine-tuning for ``unet``, sized for a fair comparison.

    SaRA trains the smallest ``fraction`` of the UNet's entries (with the
    authors' nuclear-norm weight and progressive adjustment at half of training).
    LoRA gets ``lora_rank`` or, by default, the rank that trains about as many
    numbers as that SaRA selection.
    """
    from ...sara.selection import select_parameters
    from ...training.lora import LoRA
    from ...training.sara import SaRA

    name = canonical_method_name(name)
    if name in CONTROL_METHODS:  # built exactly as the controls study builds it (count- or rank-matched)
        from ...study.config import FULL
        from ...study.run import make_method as study_method
        from ...study.run import method_spec

        spec = method_spec(FULL, CONTROL_METHODS[name], "cyberpunk", 0, 1e-3, fraction=fraction)  # style, lr unused
        return study_method(spec, unet, FULL)
    if name == "SaRA":
        return SaRA(fraction=fraction)
    if name == "LoRA":
        if lora_rank is not None:
            return LoRA(rank=lora_rank)
        budget = select_parameters(unet, fraction=fraction).total_selected
        return LoRA.matched_to(unet, int(budget))
    return FullFineTuning()


def _resolve_methods(methods, unet, fraction, lora_rank) -> dict[str, TrainingMethod]:
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, dict):
        resolved = dict(methods)
        bad = {k: type(v).__name__ for k, v in resolved.items() if not hasattr(v, "build_optimizer")}
        if bad:
            raise ConfigError(f"methods must map names to TrainingMethod objects (SaRA(), LoRA(...), ...); got {bad}")
    else:
        resolved = {}
        for m in methods:
            if hasattr(m, "build_optimizer"):
                resolved[getattr(m, "name", type(m).__name__)] = m
            else:
                resolved[canonical_method_name(m)] = make_method(m, unet, fraction=fraction, lora_rank=lora_rank)
    if not resolved:
        raise ConfigError("give at least one method, e.g. methods=('SaRA', 'LoRA', 'full fine-tuning')")
    if REFERENCE in resolved:
        raise ConfigError(f"{REFERENCE!r} names the untouched base model in comparisons; call the method otherwise")
    return resolved


def _lr_for(lr, name):
    if isinstance(lr, dict):
        if name not in lr:
            raise ConfigError(f"no learning rate for {name!r} in lr={lr}; give one per method or a single number")
        return lr[name]
    return lr


# ------------------------------------------------------------------ results

@dataclass
class FineTuned:
    """One fine-tuned model and what it cost."""

    name: str
    pipe: object  # a TinyDiffusion: merged, a plain model
    method: TrainingMethod
    history: pd.DataFrame
    memory: MemoryReport
    trainable: int  # numbers the method trained (SaRA: as selected, before progressive adjustment)
    file_bytes: int  # size of what you would ship: sparse values, adapter, or the whole state dict
    step_time_s: float  # median wall-clock time of the untracked steps
    train_seconds: float  # the whole run, tracked steps included
    file: Path | None = None  # where the file is, when ``out_dir`` was given


@dataclass
class Comparison:
    """What :func:`finetune_methods` returns: the base model, the runs, and the shared settings."""

    base: object
    style: str
    runs: dict[str, FineTuned]
    settings: dict = field(default_factory=dict)
    step_times: pd.DataFrame | None = None  # from fair_step_times: interleaved, process CPU, tracker off

    @property
    def pipes(self) -> dict:
        """``{"pretrained": base, method: fine-tuned pipe, ...}``, for samples and metrics."""
        return {REFERENCE: self.base, **{name: run.pipe for name, run in self.runs.items()}}

    @property
    def histories(self) -> dict[str, pd.DataFrame]:
        return {name: run.history for name, run in self.runs.items()}

    @property
    def memory(self) -> dict[str, MemoryReport]:
        return {name: run.memory for name, run in self.runs.items()}

    def costs(self) -> pd.DataFrame:
        """One row per method: trained values, saved file, peak memory, step time, final loss."""
        total = sum(p.numel() for p in self.base.unet.parameters())
        rows = []
        for name, run in self.runs.items():
            rows.append({"method": name, "trainable parameters": run.trainable,
                         "% of the UNet": 100 * run.trainable / total,
                         "saved file (MB)": run.file_bytes / MB,
                         "peak memory above frozen weights (MB)": run.memory.peak_above_frozen / MB,
                         "median step time (s)": self._step_time(name, run),
                         "learning rate": _lr_for(self.settings["lr"], name),
                         "training time (s)": run.train_seconds,
                         "final loss (mean of last 10 steps)": float(run.history.loss.tail(10).mean())})
        return pd.DataFrame(rows).set_index("method")

    def _step_time(self, name, run) -> float:
        """The fair step time when it was measured, else the training run's own median (wall clock)."""
        if self.step_times is not None and name in self.step_times.index:
            return float(self.step_times.loc[name, "seconds"])
        return run.step_time_s


# ------------------------------------------------------------------ training


def study_learning_rates() -> dict[str, float]:
    """The learning rate the course's study chose for each of :data:`DEFAULT_METHODS` (``reports/study.md``).

    The study searched each method's rate on two styles and seeds at its 800-step
    budget; training every method at its own best rate is the fair comparison (one
    shared rate favours whichever method it happens to suit).
    """
    from ...study.config import CHOSEN_LRS, NOTEBOOK_METHODS

    return {label: CHOSEN_LRS[NOTEBOOK_METHODS[label]] for label in DEFAULT_METHODS}


def study_controls_learning_rates() -> dict[str, float]:
    """The rate the controls study's search chose for each of :data:`CONTROL_METHODS` (``reports/controls.md``)."""
    from ...study.config import CONTROLS_CHOSEN_LRS

    return {label: CONTROLS_CHOSEN_LRS[key] for label, key in CONTROL_METHODS.items()}


@dataclass(frozen=True)
class Protocol:
    """What one comparison run fixes: the images, the budget and the scoring (the study's :data:`FULL`)."""

    steps: int
    batch_size: int
    limit_per_digit: int  # training images per digit of the style set (digits 0-6)
    n_per_digit: int  # samples per digit for the metrics
    sample_steps: int  # DDIM steps per sample


def study_protocol() -> Protocol:
    """The course study's protocol, which notebooks 03 and 04 use in their full setting.

    One protocol, so that a notebook's numbers and the study's row for the same
    style, seed and rate measure the same thing. The study's is the one kept: its
    56 images per style (8 per digit) make its 100+ runs affordable on a CPU, and
    by its 800 steps full fine-tuning learns every style and SaRA has saturated
    (the rank-matched LoRA not on every style: ``reports/budget_methods.csv``).
    """
    from ...study.config import FULL

    return Protocol(steps=FULL.steps, batch_size=FULL.batch_size, limit_per_digit=FULL.limit_per_digit,
                    n_per_digit=FULL.eval_per_digit, sample_steps=FULL.eval_steps)


def fair_step_times(pipe, dataset, methods: dict, *, lr=1e-3, batch_size: int = 16, repeats: int = 5,
                    warmup: int = 1, seed: int = 0, reference: str | None = None) -> pd.DataFrame:
    """Seconds per training step of each method, timed fairly (see :func:`~sara_edu.measure.timing.compare_step_times`).

    Each method is attached to its own fresh copy of ``pipe`` and runs the same batch;
    the methods take turns (interleaved rounds, warm-up excluded), the clock is the
    process's CPU time on a CPU, and no memory tracker is active. ``methods``: ``{label:
    TrainingMethod}`` not yet attached (copies are used, the originals stay untouched).
    """
    from ...measure.timing import compare_step_times
    from ..sara_step_by_step import denoising_loss, fixed_batches

    (batch,) = fixed_batches(pipe, dataset, 1, batch_size=batch_size, seed=seed)
    steps = {}
    for name, method in methods.items():
        work, method = copy.deepcopy(pipe), copy.deepcopy(method)
        work.unet.train()
        optimizer = method.build_optimizer(work.unet, lr=_lr_for(lr, name), weight_decay=1e-2,
                                           total_steps=warmup + repeats + 1)

        def step(unet=work.unet, optimizer=optimizer):
            denoising_loss(unet, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return compare_step_times(steps, repeats=repeats, warmup=warmup, reference=reference)

def _check_base(pipe) -> None:
    from ...sara.attach import MODULE_FLAG, attached_owner
    from ...training.lora import has_lora

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ConfigError(f"expected a course pipe (with .unet), e.g. sara_edu.load_pretrained(), "
                          f"got {type(pipe).__name__}")
    if attached_owner(unet) is not None or MODULE_FLAG in vars(unet) or has_lora(unet):
        raise ConfigError("the base model already has SaRA or a LoRA adapter attached; compare methods from a "
                          "plain pretrained model (sara_edu.load_pretrained())")


def _save_and_merge(name, method, unet, path: Path) -> int:
    """Write what this method would ship, then make the model plain again; return the file size."""
    from ...io import save_tensors
    from ...training.lora import LoRA, has_lora, merge_lora, save_lora

    if isinstance(method, LoRA) or has_lora(unet):
        save_lora(unet, path)
        merge_lora(unet)
    elif hasattr(method, "save") and hasattr(method, "detach"):  # SaRA / selective: positions + values
        method.save(path)
        method.detach(requires_grad=False)
    else:  # full fine-tuning (or any dense method): the whole state dict
        save_tensors(unet.state_dict(), path, {"method": name})
    unet.requires_grad_(False)
    return path.stat().st_size


def _trainable_count(method, unet) -> int:
    opt = getattr(method, "optimizer", None)
    selection = getattr(opt, "selection", None)
    if selection is not None:  # SaRA / selective: the selection, before progressive adjustment
        return int(selection.total_selected)
    return int(method.trainable_parameters(unet))


def finetune_one(pipe, dataset, method: TrainingMethod, *, name: str | None = None, steps: int = 100,
                 lr: float = 1e-3, batch_size: int = 16, seed: int = 0, tracked_steps: int = 2,
                 out_dir=None, progress: bool = True, copy_pipe: bool = True, **train_kwargs) -> FineTuned:
    """Fine-tune a copy of ``pipe`` with ``method``; measure memory, time and file size; merge.

    The :class:`~sara_edu.measure.memory.MemoryTracker` counts from the moment the method
    is attached through the first ``tracked_steps`` steps (by then the optimizer
    state exists and one steady-state step has run); the remaining steps run
    untracked and give the step time. ``out_dir``: keep the saved file there
    (``<name>.safetensors``); by default it is written to a temporary folder,
    measured and deleted.
    """
    from ...training.loop import train

    name = name or getattr(method, "name", type(method).__name__)
    if not isinstance(tracked_steps, int) or tracked_steps < 1:
        raise ConfigError(f"tracked_steps must be a positive integer, got {tracked_steps!r}")
    work = copy.deepcopy(pipe) if copy_pipe else pipe
    work.to(pick_device(train_kwargs.pop("device", None)))  # before tracking: the tracker follows the model's device
    unet = work.unet
    tracker = MemoryTracker(model=unet)
    start = time.perf_counter()
    with tracker:
        history = train(work, dataset, tracker.watching(method), steps=steps, lr=lr, batch_size=batch_size,
                        seed=seed, device=work.device, progress=progress, desc=name,
                        callback=tracker.stop_after(tracked_steps), memory_tracker=tracker, **train_kwargs)
    seconds = time.perf_counter() - start
    report = tracker.report(unet)
    untracked = history.step_time_s.iloc[tracked_steps:]
    step_time = float(untracked.median()) if len(untracked) else float(history.step_time_s.median())
    trainable = _trainable_count(method, unet)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            size = _save_and_merge(name, method, unet, Path(tmp) / f"{safe}.safetensors")
        file = None
    else:
        file = Path(out_dir) / f"{safe}.safetensors"
        size = _save_and_merge(name, method, unet, file)
    unet.eval()
    return FineTuned(name, work, method, history, report, trainable, size, step_time, seconds, file)


def finetune_methods(pipe, style: str, methods=DEFAULT_METHODS, *, steps: int = 100, lr=1e-3, batch_size: int = 16,
                     fraction: float = 0.1, lora_rank: int | None = None, limit_per_digit: int | None = None,
                     seed: int = 0, tracked_steps: int = 2, out_dir=None, progress: bool = True,
                     dataset=None, device=None) -> Comparison:
    """Fine-tune each method on ``style`` with the same budget; return a :class:`Comparison`.

    ``methods``: names from :data:`DEFAULT_METHODS` (``"sara"``, ``"lora"``,
    ``"full"`` work too), or a dict ``{label: TrainingMethod}`` for your own
    variants (e.g. ``{"λ = 0": SaRA(rank_lambda=0)}``). Each starts from a deep
    copy of ``pipe``, which is left untouched. ``lr``: one learning rate for all
    (the same budget) or a dict per label. ``fraction`` sizes SaRA and, through
    rank matching, LoRA. The data is ``StyleDataset(style, limit_per_digit=...)``
    (digits 0-6) unless ``dataset`` is given. ``device``: where to train (default: CUDA if
    present, else CPU); the trained models stay there.
    """
    from ...world.data import StyleDataset

    _check_base(pipe)
    if steps <= tracked_steps:
        raise ConfigError(f"steps ({steps}) must exceed tracked_steps ({tracked_steps}): the untracked steps give "
                          "the step time")
    resolved = _resolve_methods(methods, pipe.unet, fraction, lora_rank)
    rates = {name: _lr_for(lr, name) for name in resolved}  # a missing rate fails before any training
    unattached = {name: copy.deepcopy(method) for name, method in resolved.items()}  # for the fair timing
    data = dataset if dataset is not None else StyleDataset(style, limit_per_digit=limit_per_digit)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, method in resolved.items():
        runs[name] = finetune_one(pipe, data, method, name=name, steps=steps, lr=rates[name],
                                  batch_size=batch_size, seed=seed, tracked_steps=tracked_steps, out_dir=out_dir,
                                  progress=progress, device=device)
    settings = {"style": style, "steps": steps, "lr": lr, "batch_size": batch_size, "images": len(data),
                "seed": seed, "fraction": fraction, "tracked_steps": tracked_steps}
    step_times = fair_step_times(pipe, data, unattached, lr=lr, batch_size=batch_size, seed=seed,
                                 reference=next(iter(unattached)))
    return Comparison(pipe, style, runs, settings, step_times)
