"""Notebook 05 (Stable Diffusion on a GPU): load the real model, or a tiny stand-in."""
from __future__ import annotations

import torch

from ..colours import method_colour
from ..errors import CheckpointError
from ..sd.load import SD15_ID, StableDiffusionAdapter, load_stable_diffusion
from ..sd.tiny import tiny_sd_pipeline


def load_or_stand_in(model_id_or_path=SD15_ID, device=None) -> tuple["StableDiffusionAdapter", bool, str]:
    """Stable Diffusion on a GPU, else the tiny SD-shaped stand-in: ``(pipe, is_real, why)``.

    Fine-tuning SD1.5 on a CPU would take days, so without CUDA (or when the
    weights cannot be loaded) the notebook runs the very same code on
    :func:`tiny_sd_pipeline`. ``why`` says plainly which one you got and why.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        why = ("No CUDA GPU here: fine-tuning Stable Diffusion 1.5 (860M-parameter UNet) on a CPU would take days. "
               "Running the same code on tiny_sd_pipeline(), a randomly initialised SD-shaped model (64 px): "
               "its samples are noise; the point is that every cell runs. Open this notebook on a GPU for real results.")
        return tiny_sd_pipeline(seed=0, device=device), False, why
    try:
        return load_stable_diffusion(model_id_or_path, device=device), True, f"Loaded {model_id_or_path} on {device}."
    except CheckpointError as e:
        why = (f"Could not load {model_id_or_path}: {e}\nRunning the same code on tiny_sd_pipeline() instead "
               "(a randomly initialised, SD-shaped model).")
        return tiny_sd_pipeline(seed=0, device=device), False, why


SUMMARY_COLUMNS = ("peak memory (MB)", "step time (s, median)", "saved file (MB)")


def training_step_time(history, device, tracked_steps: int = 2) -> float:
    """Median seconds per training step of the steps that ran without the memory tracker.

    On CUDA the notebook trains without the tracker (the allocator gives the peak); the first step pays
    one-off costs (allocations, kernel selection) and is left out. On a CPU the tracker counts the memory of the
    attach and the first ``tracked_steps`` steps and then stops (:meth:`MemoryTracker.stop_after`), because it
    slows every operation; the later steps are timed. These are one run's wall times, one method after the
    other: ``benchmarks/memory_time.py`` times the methods interleaved, in process CPU time, for ratios to quote.
    Raises :class:`ConfigError` when no step is left to time.
    """
    from ..errors import ConfigError

    cuda = torch.device(device).type == "cuda"
    skip = 1 if cuda else tracked_steps
    if len(history) <= skip:
        raise ConfigError(f"{len(history)} training steps leave none to time after the {skip} "
                          f"{'warm-up' if cuda else 'tracked'} step(s): train at least {skip + 1} steps")
    return float(history.step_time_s.iloc[skip:].median())


def plot_sd_summary(summary, full_unet_mb: float, title: str = ""):
    """Notebook 05's cost figure: peak memory, median step time and saved file size per method.

    ``summary``: one row per method (index: method name) with :data:`SUMMARY_COLUMNS`.
    Every panel is a linear axis from 0, so bar heights compare as the numbers do (a log axis
    with a cut-off base made a 2.2x gap look like 6x). The whole UNet (``full_unet_mb``, fp32)
    would dwarf the files, so it is named in the file panel's title and each file bar says
    which share of it it is.
    """
    import matplotlib.pyplot as plt

    from ..errors import ConfigError

    missing = [c for c in SUMMARY_COLUMNS if c not in getattr(summary, "columns", ())]
    if missing:
        raise ConfigError(f"summary lacks the column(s) {missing}; build it as notebook 05 does (one row per method)")
    if not full_unet_mb > 0:
        raise ConfigError(f"full_unet_mb must be the size of the whole UNet in MB (> 0), got {full_unet_mb!r}")
    names = list(summary.index)
    colours = [method_colour(n) for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, column in zip(axes, SUMMARY_COLUMNS):
        values = summary[column].astype(float)
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(column, fontsize=10)
        for x, v in enumerate(values):
            text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
            if column == SUMMARY_COLUMNS[2]:
                text += f"\n({v / full_unet_mb:.1%} of the UNet)"
            ax.text(x, v, text, ha="center", va="bottom", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max(float(values.max()), 1e-9) * 1.3)  # from 0, with room for the labels
    axes[2].set_title(f"{SUMMARY_COLUMNS[2]}\nfull UNet (fp32): {full_unet_mb:,.3g} MB", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
