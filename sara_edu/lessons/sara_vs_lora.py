"""SaRA versus LoRA versus full fine-tuning, under the same budget: the logic of notebook 04.

The paper's comparison in miniature. Every method starts from its own copy of
the *same* pretrained model and trains on the *same* style data with the *same*
budget (optimizer steps, batch size, learning rate, seed, cosine schedule),
through the course's one training loop (:func:`sara_edu.training.train`). Only
*what* trains differs:

* **SaRA**: the smallest 10% of |w| (sparse, low-rank penalty, progressive);
* **LoRA**: a low-rank adapter whose rank is chosen so that it trains about as
  many numbers as SaRA (:func:`sara_edu.training.lora.lora_rank_matching`);
* **full fine-tuning**: every weight.

:func:`finetune_methods` trains them and measures, for each, what it costs:
peak memory with its breakdown (a :class:`~sara_edu.measure.memory.MemoryTracker`
watches the attach and the first ``tracked_steps`` steps, as in
``benchmarks/memory_time.py``), the median time of the untracked steps, the
number of trained values and the size of the file one would ship. Afterwards
every model is merged into a plain model, so all of them generate the same way.

:func:`metric_table` then asks the three questions of the paper: does the
model draw the new style (FID analogue, prompt agreement, VLHI), does it still
draw plain digits (the prior it keeps), and does the style carry over to digits
it never saw in the style (generalisation)? :func:`side_by_side` is the logic
behind the notebook's sample widget.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..errors import ConfigError, DataError
from ..measure.memory import CATEGORIES, MB, MemoryReport, MemoryTracker
from ..training.loop import pick_device
from ..training.method import FullFineTuning, TrainingMethod

#: The methods of notebook 04, in the order they are shown.
DEFAULT_METHODS = ("SaRA", "LoRA", "full fine-tuning")
REFERENCE = "pretrained"
_ALIASES = {"sara": "SaRA", "lora": "LoRA", "full": "full fine-tuning", "full fine-tuning": "full fine-tuning",
            "fullfinetuning": "full fine-tuning", "full-fine-tuning": "full fine-tuning"}
# One colour per method everywhere in the course's comparison figures.
COLOURS = {REFERENCE: "0.55", "SaRA": "tab:red", "LoRA": "tab:blue", "full fine-tuning": "tab:green",
           "selective (no UB)": "tab:purple"}


# ------------------------------------------------------------------ methods

def canonical_method_name(name: str) -> str:
    """``"sara"`` -> ``"SaRA"``, ``"lora"`` -> ``"LoRA"``, ``"full"`` -> ``"full fine-tuning"``."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ConfigError(f"unknown method {name!r}; use one of {list(DEFAULT_METHODS)} "
                          "(or pass your own TrainingMethod objects in a dict {name: method})")
    return _ALIASES[key]


def make_method(name: str, unet, *, fraction: float = 0.1, lora_rank: int | None = None) -> TrainingMethod:
    """The course's SaRA, LoRA or full fine-tuning for ``unet``, sized for a fair comparison.

    SaRA trains the smallest ``fraction`` of the UNet's entries (with the
    authors' nuclear-norm weight and progressive adjustment at half of training).
    LoRA gets ``lora_rank`` or, by default, the rank that trains about as many
    numbers as that SaRA selection.
    """
    from ..sara.selection import select_parameters
    from ..training.lora import LoRA
    from ..training.sara import SaRA

    name = canonical_method_name(name)
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
    from ..study.config import CHOSEN_LRS, NOTEBOOK_METHODS

    return {label: CHOSEN_LRS[NOTEBOOK_METHODS[label]] for label in DEFAULT_METHODS}


def paper_claims() -> pd.DataFrame:
    """The paper's claims as the course's study checked them (``reports/study.md``), one row per claim.

    Read from the committed study (``reports/study_results.csv``) and benchmark results
    in a checkout of the repository; an installed package without them raises
    :class:`DataError` saying where to find the table.
    """
    from ..study.config import FULL
    from ..study.claims import CLAIMS_COLUMNS, claims_rows
    from ..study.select import load_study
    from ..world.paths import REPO_ROOT

    csv = REPO_ROOT / "reports" / "study_results.csv"
    if not csv.exists():
        raise DataError(f"no committed study at {csv}: the claims table is in reports/study.md of the course's "
                        "repository (or run `python -m sara_edu.study run` and `... report` there)")
    rows = claims_rows(load_study(csv, FULL.name), REPO_ROOT)
    return pd.DataFrame(rows, columns=CLAIMS_COLUMNS).set_index(CLAIMS_COLUMNS[0])


def fair_step_times(pipe, dataset, methods: dict, *, lr=1e-3, batch_size: int = 16, repeats: int = 5,
                    warmup: int = 1, seed: int = 0, reference: str | None = None) -> pd.DataFrame:
    """Seconds per training step of each method, timed fairly (see :func:`~sara_edu.measure.timing.compare_step_times`).

    Each method is attached to its own fresh copy of ``pipe`` and runs the same batch;
    the methods take turns (interleaved rounds, warm-up excluded), the clock is the
    process's CPU time on a CPU, and no memory tracker is active. ``methods``: ``{label:
    TrainingMethod}`` not yet attached (copies are used, the originals stay untouched).
    """
    from ..measure.timing import compare_step_times
    from .sara_step_by_step import denoising_loss, fixed_batches

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
    from ..sara.attach import MODULE_FLAG, attached_owner
    from ..training.lora import has_lora

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ConfigError(f"expected a course pipe (with .unet), e.g. sara_edu.load_pretrained(), "
                          f"got {type(pipe).__name__}")
    if attached_owner(unet) is not None or MODULE_FLAG in vars(unet) or has_lora(unet):
        raise ConfigError("the base model already has SaRA or a LoRA adapter attached; compare methods from a "
                          "plain pretrained model (sara_edu.load_pretrained())")


def _save_and_merge(name, method, unet, path: Path) -> int:
    """Write what this method would ship, then make the model plain again; return the file size."""
    from ..io import save_tensors
    from ..training.lora import LoRA, has_lora, merge_lora, save_lora

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
    from ..training.loop import train

    name = name or getattr(method, "name", type(method).__name__)
    if not isinstance(tracked_steps, int) or tracked_steps < 1:
        raise ConfigError(f"tracked_steps must be a positive integer, got {tracked_steps!r}")
    work = copy.deepcopy(pipe) if copy_pipe else pipe
    work.to(pick_device(train_kwargs.pop("device", None)))  # before tracking: the tracker follows the model's device
    unet = work.unet
    tracker = MemoryTracker(model=unet)

    def stop_tracking(step, pipe, optimizer):
        if step == tracked_steps:
            tracker.stop()

    start = time.perf_counter()
    with tracker:
        history = train(work, dataset, tracker.watching(method), steps=steps, lr=lr, batch_size=batch_size,
                        seed=seed, device=work.device, progress=progress, desc=name, callback=stop_tracking,
                        memory_tracker=tracker, **train_kwargs)
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
    from ..world.data import StyleDataset

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


# ------------------------------------------------------------------ costs

def memory_breakdown_frame(obj) -> pd.DataFrame:
    """Peak memory per method, split by what it holds (MB): one row per method.

    ``obj``: a :class:`Comparison` or ``{name: MemoryReport}``. Columns: the
    :data:`~sara_edu.measure.memory.CATEGORIES` (trainable values, optimizer state,
    gradients, method buffers, activations + transients), whose sum is
    ``peak above frozen``, and ``frozen weights`` (there whatever the method).
    """
    reports = obj.memory if isinstance(obj, Comparison) else dict(obj)
    if not reports:
        raise ConfigError("no memory reports to show")
    rows = {}
    for name, r in reports.items():
        if not isinstance(r, MemoryReport):
            raise ConfigError(f"expected MemoryReport values, got {type(r).__name__} for {name!r}")
        rows[name] = {**{c.replace("_", " "): getattr(r, c) / MB for c in CATEGORIES},
                      "peak above frozen": r.peak_above_frozen / MB, "frozen weights": r.frozen_weights / MB}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method (MB)")


def _colour(name):
    return COLOURS.get(name, None)


def _short_names(names, width: int = 12) -> list[str]:
    """Method names wrapped onto lines of about ``width`` characters, for tick labels under narrow bars."""
    import textwrap

    return [textwrap.fill(str(n), width, break_on_hyphens=False) for n in names]


def _stacked_memory(ax, frame: pd.DataFrame, categories, palette) -> pd.Series:
    """Stack ``categories`` (MB) per method on ``ax``; return each method's total."""
    names = list(frame.index)
    bottom = pd.Series(0.0, index=names)
    for c in categories:
        col = c.replace("_", " ")
        ax.bar(range(len(names)), frame[col], bottom=bottom, label=col, color=palette[c], width=0.6)
        bottom += frame[col]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(float(bottom.max()), 1e-9) * 1.18)
    ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
    return bottom


def plot_costs(comparison: Comparison, title: str | None = None):
    """What each method costs, in two rows sized for the notebook column.

    Top: peak training memory above the frozen weights split by what it holds (MB), and
    next to it the method's *own* memory (the same parts without activations + transients,
    which are set by the batch and the model, not the method) on its own scale, so that a
    difference of a few MB is not lost beside tens of MB of activations. Bottom: median
    step time (s), trained values (thousands) and saved file size (MB).
    """
    import matplotlib.pyplot as plt

    frame = memory_breakdown_frame(comparison)
    costs = comparison.costs()
    names = list(frame.index)
    fig = plt.figure(figsize=(9, 7.6))
    grid = fig.add_gridspec(3, 6, height_ratios=[1.25, 0.14, 1])  # the middle row holds the legend
    everything, own = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])
    palette = dict(zip(CATEGORIES, plt.get_cmap("tab10").colors))
    method_parts = [c for c in CATEGORIES if c != "activations_transients"]
    _stacked_memory(everything, frame, CATEGORIES, palette)
    everything.set_ylabel("MB at the peak (above the frozen weights)")
    everything.set_title("Peak training memory, all of it", fontsize=10)
    _stacked_memory(own, frame, method_parts, palette)
    own.set_ylabel("MB at the peak")
    own.set_title("The method's own part (without activations),\non its own scale", fontsize=10)
    legend = fig.add_subplot(grid[1, :])
    legend.axis("off")
    legend.legend(*everything.get_legend_handles_labels(), fontsize=8, loc="center", ncol=5, frameon=False)
    colours = [_colour(n) for n in names]
    clock = "process CPU s" if comparison.step_times is None else comparison.step_times.clock.iloc[0]
    panels = [("median step time (s)", 1, f"seconds per step ({clock})", "Step time (fair, interleaved)", "{:.3f} s"),
              ("trainable parameters", 1e3, "thousands of numbers trained", "Trained values", "{:,.0f}k"),
              ("saved file (MB)", 1, "MB on disk", "Saved file (what you ship)", "{:.2f} MB")]
    for i, (column, unit, ylabel, panel_title, fmt) in enumerate(panels):
        ax = fig.add_subplot(grid[2, 2 * i:2 * i + 2])
        values = costs[column].reindex(names) / unit
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        for x, v in enumerate(values):
            ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylim(0, max(float(values.max()), 1e-12) * 1.2)
    for ax in fig.axes:
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    s = comparison.settings
    fig.suptitle(title or f"What fine-tuning costs: {s.get('steps')} steps, batch {s.get('batch_size')}, "
                          f"'{comparison.style}' style\n(memory: attach + first {s.get('tracked_steps')} steps, CPU)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot_losses(histories: dict, window: int = 10, ax=None, title: str = "Training loss"):
    """Loss per step (thin) and its running mean over ``window`` steps (thick), one colour per run."""
    import matplotlib.pyplot as plt

    histories = histories.histories if isinstance(histories, Comparison) else histories
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, h) in enumerate(histories.items()):
        colour = _colour(name) or plt.get_cmap("tab10")(i)
        dashes = ("-", "--", ":", "-.")[i % 4]  # runs that coincide stay visible
        ax.plot(h.step, h.loss, color=colour, alpha=0.25, lw=0.8, ls=dashes)
        ax.plot(h.step, h.loss.rolling(window, min_periods=1).mean(), color=colour, lw=2, ls=dashes, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("denoising loss (MSE of predicted noise)")
    ax.set_title(f"{title} (thick: mean of the last {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


# ------------------------------------------------------------------ samples

def _check_pipes(pipes) -> dict:
    if isinstance(pipes, Comparison):
        pipes = pipes.pipes
    if not isinstance(pipes, dict) or not pipes:
        raise ConfigError("pipes must be a non-empty dict {label: pipe}, e.g. comparison.pipes")
    return pipes


def side_by_side(pipes, prompt: str, seed: int = 0, n: int = 6, steps: int = 25, guidance_scale: float = 3.0,
                 methods=None, cache: dict | None = None):
    """One row of ``n`` samples per model for the same ``prompt`` and the same starting noise.

    Image ``i`` of every row starts from noise seeded ``seed + i``
    (:func:`sara_edu.generate`), so differences between rows come from the
    models only. ``methods``: which labels of ``pipes`` to show (default all).
    ``cache``: a dict reused between calls to skip rows already generated.
    """
    from ..world.model import generate
    from .display import show_images

    pipes = _check_pipes(pipes)
    labels = list(pipes) if methods is None else list(methods)
    unknown = [m for m in labels if m not in pipes]
    if unknown or not labels:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(pipes)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (samples per model) must be a positive integer, got {n!r}")
    rows = []
    for label in labels:
        key = (label, prompt, seed, n, steps, guidance_scale)
        if cache is None or key not in cache:
            images = generate(pipes[label], [prompt] * n, steps=steps, seed=seed, guidance_scale=guidance_scale)
            if cache is None:
                rows.append(images)
                continue
            cache[key] = images
        rows.append(cache[key])
    return show_images(torch.cat(rows), nrow=n, row_labels=labels,
                       suptitle=f"'{prompt}': seeds {seed}..{seed + n - 1} (same noise in every row), "
                                f"{steps} DDIM steps, guidance {guidance_scale:g}")


def side_by_side_view(pipes, *, n: int = 6, steps: int = 25, guidance_scale: float = 3.0):
    """``update(digit, style, seed, method) -> Figure`` for notebook 04's widget.

    ``method="all"`` shows every model (the pretrained one first); a single name
    shows the pretrained model and that one. Rows already generated are cached,
    so going back to an earlier setting is instant.
    """
    from ..world.text import make_prompt

    pipes = _check_pipes(pipes)
    cache: dict = {}

    def update(digit: int = 3, style: str = "plain", seed: int = 0, method: str = "all"):
        prompt = make_prompt(int(digit), None if style in (None, "", "plain") else style)
        if method == "all":
            shown = list(pipes)
        elif method in pipes:
            shown = [m for m in (REFERENCE, method) if m in pipes] if method != REFERENCE else [method]
        else:
            raise ConfigError(f"unknown method {method!r}; choose 'all' or one of {list(pipes)}")
        return side_by_side(pipes, prompt, seed=int(seed), n=n, steps=steps, guidance_scale=guidance_scale,
                            methods=shown, cache=cache)

    return update


# ------------------------------------------------------------------ metrics

METRIC_COLUMNS = {
    "style_fid": "trained style, digits 0-6: FID analogue (lower is better)",
    "style_kid": "trained style, digits 0-6: KID analogue (unbiased on few samples; lower is better, ~0 = real)",
    "style_agreement": "trained style, digits 0-6: prompt agreement (digit and look right)",
    "style_gate_pass": "trained style, digits 0-6: share of samples that look like real images at all",
    "style_gated_agreement": "trained style, digits 0-6: prompt agreement counting only samples that pass the gate",
    "vlhi": "VLHI across the fine-tuned methods (0..2, higher is better)",
    "plain_agreement": "plain prompts, digits 0-9: prompt agreement (keeps the original skill)",
    "plain_fid": "plain prompts, digits 0-9: FID analogue",
    "unseen_agreement": "trained style, unseen digits 7-9: prompt agreement (generalises)",
    "unseen_look_acc": "trained style, unseen digits 7-9: look accuracy",
}


def metric_table(pipes, style: str, *, n_per_digit: int = 10, steps: int = 25, seed: int = 0,
                 guidance_scale: float = 3.0, finetune_digits=None, unseen_digits=None, evaluate=None,
                 progress: bool = True) -> pd.DataFrame:
    """The paper's metrics for each model, plus what it kept and how it generalises.

    For every model in ``pipes`` (a :class:`Comparison` or ``{label: pipe}``),
    with the same prompts and seeds for all:

    * **trained style** on the fine-tuning digits (0-6): ``style_fid`` (FID
      analogue against held-out styled digits), ``style_kid`` (the KID
      analogue beside it, unbiased on few samples), ``style_gate_pass`` and
      ``style_gated_agreement`` (:mod:`sara_edu.world.quality`), ``style_look_acc``,
      ``style_digit_acc``, ``style_agreement`` (the CLIP-score stand-in);
    * ``vlhi``: the paper's VLHI from ``style_fid`` and ``style_agreement``,
      normalised across the fine-tuned models only (the ``"pretrained"``
      reference row, which never saw the style, gets NaN);
    * **kept skill**: plain prompts for all digits 0-9, ``plain_fid``,
      ``plain_digit_acc``, ``plain_look_acc`` (still plain?), ``plain_agreement``;
    * **generalisation**: the style on the digits left out of fine-tuning (7-9),
      ``unseen_fid``, ``unseen_digit_acc``, ``unseen_look_acc``, ``unseen_agreement``.

    ``evaluate``: a stand-in for :func:`sara_edu.world.metrics.evaluate` with the same
    signature (tests use one). Returns one row per model, indexed by label.
    """
    from tqdm.auto import tqdm

    from ..world.data import FINETUNE_DIGITS, UNSEEN_DIGITS
    from ..world.metrics import vlhi_table

    if evaluate is None:
        from ..world.metrics import evaluate
    pipes = _check_pipes(pipes)
    if style in (None, "", "plain"):
        raise ConfigError("metric_table compares a fine-tuned *style*: give the style the models were trained on")
    if not isinstance(n_per_digit, int) or n_per_digit < 1:
        raise ConfigError(f"n_per_digit must be a positive integer, got {n_per_digit!r}")
    finetune_digits = list(FINETUNE_DIGITS if finetune_digits is None else finetune_digits)
    unseen_digits = list(UNSEEN_DIGITS if unseen_digits is None else unseen_digits)
    tasks = [("style", style, finetune_digits), ("plain", None, list(range(10))), ("unseen", style, unseen_digits)]
    keys = ("fid", "digit_acc", "look_acc", "agreement")
    rows = []
    bar = tqdm(total=len(pipes) * len(tasks), desc="evaluating", disable=not progress, leave=False)
    for label, pipe in pipes.items():
        row = {"method": label}
        for prefix, look, digits in tasks:
            scores = evaluate(pipe, style=look, digits=digits, n_per_digit=n_per_digit, seed=seed, steps=steps,
                              guidance_scale=guidance_scale)
            row.update({f"{prefix}_{k}": float(scores[k]) for k in keys})
            if prefix == "style":
                row.update({f"style_{k}": float(scores[k]) for k in ("kid", "gate_pass", "gated_agreement")})
            bar.update()
        rows.append(row)
    bar.close()
    table = pd.DataFrame(rows).set_index("method")
    tuned = table.drop(index=[REFERENCE], errors="ignore")
    table["vlhi"] = float("nan")
    if len(tuned):
        table.loc[tuned.index, "vlhi"] = vlhi_table(tuned, fid_col="style_fid", clip_col="style_agreement")["vlhi"]
    order = ["style_fid", "style_kid", "style_look_acc", "style_digit_acc", "style_agreement", "style_gate_pass",
             "style_gated_agreement", "vlhi",
             "plain_fid", "plain_digit_acc", "plain_look_acc", "plain_agreement",
             "unseen_fid", "unseen_digit_acc", "unseen_look_acc", "unseen_agreement"]
    table = table[order]
    table.attrs.update({"style": style, "n_per_digit": n_per_digit, "steps": steps, "seed": seed})
    return table


def plot_metric_table(table: pd.DataFrame, title: str | None = None):
    """Four bar panels from :func:`metric_table`: style FID, and prompt agreement (%) on the
    trained style, on plain prompts (kept skill) and on unseen digits (generalisation)."""
    import matplotlib.pyplot as plt

    missing = [c for c in ("style_fid", "style_agreement", "plain_agreement", "unseen_agreement") if c not in table]
    if missing:
        raise ConfigError(f"expected a table from metric_table(); missing columns {missing}")
    names = list(table.index)
    colours = [_colour(n) or "tab:orange" for n in names]
    style = table.attrs.get("style", "the trained")
    panels = [("style_fid", "FID analogue (feature units²)", f"'{style}' style, digits 0-6\nFID (lower is better)", 1),
              ("style_agreement", "% of samples: digit and look right",
               f"'{style}' style, digits 0-6\nprompt agreement", 100),
              ("plain_agreement", "% of samples: digit right, still plain",
               "plain prompts, digits 0-9\nkept skill", 100),
              ("unseen_agreement", "% of samples: digit and look right",
               f"'{style}' style on unseen digits 7-9\ngeneralisation", 100)]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.8))  # 2 x 2: four panels in a row would not fit the column
    for ax, (col, ylabel, panel_title, scale) in zip(axes.flat, panels):
        values = table[col] * scale
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.0f}" if scale == 100 or abs(v) >= 100 else f"{v:.3g}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        if scale == 100:
            ax.set_ylim(0, 110)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    n = table.attrs.get("n_per_digit")
    fig.suptitle(title or f"What each model learned, kept and generalised"
                          f"{f' ({n} samples per digit)' if n else ''}", fontsize=11)
    fig.tight_layout()
    return fig


def summary_table(comparison: Comparison, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Costs and (optionally) the headline metrics in one table, one row per method."""
    table = comparison.costs()[["trainable parameters", "saved file (MB)", "peak memory above frozen weights (MB)",
                                "median step time (s)"]]
    if metrics is not None:
        cols = [c for c in ("style_fid", "style_agreement", "vlhi", "plain_agreement", "unseen_agreement")
                if c in metrics]
        table = table.join(metrics[cols], how="outer")
        table = table.loc[[n for n in metrics.index if n in table.index] +
                          [n for n in table.index if n not in metrics.index]]
        table["trainable parameters"] = table["trainable parameters"].astype("Int64")  # a count, even beside NaN
    return table


__all__ = ["DEFAULT_METHODS", "REFERENCE", "FineTuned", "Comparison", "canonical_method_name", "make_method",
           "finetune_one", "finetune_methods", "memory_breakdown_frame", "plot_costs", "plot_losses",
           "side_by_side", "side_by_side_view", "metric_table", "plot_metric_table", "summary_table",
           "METRIC_COLUMNS"]

