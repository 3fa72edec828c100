"""Conventions shared by every course notebook.

* **QUICK vs full.** ``SARA_EDU_QUICK=1`` (what CI sets) makes every notebook
  run in a few minutes on a 2-core CPU with fewer steps and samples; without it
  the notebooks use the settings whose results a teacher would show. Notebooks
  never test ``QUICK`` themselves: they write ``steps = choose(quick=5, full=25)``
  so both values are visible side by side in the cell.
* **Set-up.** A notebook's first code cell ends with :func:`setup_notebook`, which
  seeds Python, NumPy and torch, sets display defaults and prints the setting.
* **Looking at things.** :func:`show_images` draws a grid of generated images,
  :func:`environment_report` says what the notebook is running on, and
  :func:`sara_overview_figure` is the course's "SaRA in one picture".
* **Timing.** ``with timed("generation"):`` prints how long a cell took, so the
  notebooks can state (measured, not guessed) what the full setting costs.

Committed notebooks carry no outputs; ``python -m sara_edu.course --strip
notebooks/*.ipynb`` removes them (the notebook tests check it).
"""
from __future__ import annotations

import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


#: True when the notebooks should run their quick (CI) setting: ``SARA_EDU_QUICK=1``.
QUICK: bool = _env_flag("SARA_EDU_QUICK")


def is_quick() -> bool:
    """Re-read ``SARA_EDU_QUICK`` (``QUICK`` is fixed at import time)."""
    return _env_flag("SARA_EDU_QUICK")


def choose(*, quick, full):
    """``quick`` in the QUICK setting (``SARA_EDU_QUICK=1``), else ``full``.

    Keyword-only on purpose: a cell reads ``choose(quick=5, full=25)`` and the
    student sees both settings without looking anything up.
    """
    return quick if is_quick() else full


def setting_banner(**values) -> str:
    """One line naming the setting in use and its values, e.g. for the top of a notebook."""
    name = ("QUICK setting (for CI and a first look; unset SARA_EDU_QUICK for the full one)" if is_quick()
            else "FULL setting (set SARA_EDU_QUICK=1 for a quick run)")
    details = ", ".join(f"{k}={v}" for k, v in values.items())
    return f"{name}" + (f": {details}" if details else "")


def setup_notebook(seed: int = 0, **setting) -> None:
    """The first call of every course notebook: seed everything, set readable display
    defaults (pandas shows 4 significant digits, figures a legible size) and print
    which setting (QUICK or full) runs with which values (:func:`setting_banner`).

        STEPS = course.choose(quick=10, full=25)
        course.setup_notebook(steps=STEPS)
    """
    import matplotlib as mpl
    import pandas as pd

    seed_everything(seed)
    pd.set_option("display.float_format", "{:.4g}".format)
    pd.set_option("display.max_columns", 20)
    pd.set_option("display.width", 140)
    pd.set_option("display.max_colwidth", 60)
    mpl.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "axes.titlesize": 10, "axes.labelsize": 9})
    print(setting_banner(**setting))  # printed, not returned: a returned str would show twice in the cell


def seed_everything(seed: int = 0) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA); return the seed."""
    import numpy as np
    import torch

    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def torch_generator(seed: int = 0):
    """A fresh ``torch.Generator`` seeded with ``seed``: randomness that no other cell disturbs."""
    import torch

    return torch.Generator().manual_seed(int(seed))


@contextmanager
def timed(label: str = "cell", *, quiet: bool = False):
    """Measure wall-clock time of a block: ``with timed("sampling") as t: ...; t.seconds``."""

    class _Timing:
        seconds = float("nan")

    timing = _Timing()
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - start
        if not quiet:
            print(f"{label}: {timing.seconds:.1f} s")


def environment_report():
    """What this notebook runs on, as a pandas Series (index: item, value: answer).

    Device, library versions, the GPU if any, where the shipped model lives and
    whether it is there, and the QUICK setting. Read it before asking "why is
    mine slower / different?".
    """
    import pandas as pd
    import torch

    from .paths import PRETRAINED_DIR

    def version(package):
        try:
            from importlib.metadata import version as v

            return v(package)
        except Exception:  # a missing optional package is information, not an error
            return "not installed"

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    model_dir = Path(PRETRAINED_DIR)
    checkpoints = sorted(p.stem for p in (model_dir / "checkpoints").glob("*.safetensors"))
    report = {
        "device": "cuda" if cuda else ("mps" if mps else "cpu"),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none",
        "gpu memory (GiB)": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else 0,
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "python executable": sys.executable,
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "peft": version("peft"),
        "sara-edu": version("sara-edu"),
        "shipped model folder": str(model_dir),
        "shipped model present": (model_dir / "unet.safetensors").exists(),
        "pretraining checkpoints": ", ".join(checkpoints) if checkpoints else "none",
        "QUICK setting": is_quick(),
    }
    return pd.Series(report, name="value", dtype=object).rename_axis("item")


def to_display(images):
    """(N, 3, H, W) in [-1, 1] (torch or NumPy) -> (N, H, W, 3) float array in [0, 1] for imshow."""
    import numpy as np

    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"expected images shaped (N, 3, H, W) (or (N, 1, H, W)), got {images.shape}")
    images = (images.clip(-1, 1) + 1) / 2
    if images.shape[1] == 1:
        images = images.repeat(3, axis=1)
    return images.transpose(0, 2, 3, 1)


def show_images(images, titles=None, nrow: int | None = None, *, suptitle: str | None = None,
                size: float = 1.1, row_labels=None):
    """Draw generated images on a grid and return the matplotlib Figure.

    ``images``: (N, 3, H, W) in [-1, 1], the format :func:`sara_edu.generate` returns.
    ``nrow``: images per row (default: all in one row, at most 10).
    ``titles``: one short title per image; ``row_labels``: one label per row.
    """
    import matplotlib.pyplot as plt

    pictures = to_display(images)
    n = len(pictures)
    if n == 0:
        raise ConfigError("show_images got no images")
    if titles is not None and len(titles) != n:
        raise ConfigError(f"got {len(titles)} titles for {n} images; give one title per image")
    per_row = int(nrow or min(n, 10))
    if per_row < 1:
        raise ConfigError(f"nrow must be >= 1, got {nrow}")
    rows = -(-n // per_row)
    if row_labels is not None and len(row_labels) != rows:
        raise ConfigError(f"got {len(row_labels)} row labels for {rows} rows")
    fig, axes = plt.subplots(rows, per_row, figsize=(size * per_row + (1.2 if row_labels else 0), size * rows + 0.3),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < n:
            ax.imshow(pictures[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(str(label), fontsize=9, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def sample_figure(pipe, *, style: str | None = None, digits=range(10), n_per_digit: int = 1, seed: int = 0,
                  steps: int = 25, guidance_scale: float = 3.0, title: str | None = None):
    """Generate ``n_per_digit`` samples for each digit (one column per digit) and draw them.

    Same arguments as :func:`sara_edu.generate`, so the figure is reproducible from
    the seed; the logic behind the sampling sliders of the notebooks.
    """
    from .model import generate
    from .text import make_prompt

    digits = list(digits)
    if n_per_digit < 1 or not digits:
        raise ConfigError(f"need at least one digit and n_per_digit >= 1, got {digits} and {n_per_digit}")
    prompts = [make_prompt(d, style) for _ in range(n_per_digit) for d in digits]
    images = generate(pipe, prompts, steps=steps, seed=seed, guidance_scale=guidance_scale)
    where = f"'{style}' style" if style else "plain digits"
    return show_images(images, titles=[f"'{d}'" for d in digits] + [""] * (len(prompts) - len(digits)),
                       nrow=len(digits),
                       suptitle=title or f"{where}: {steps} DDIM steps, guidance {guidance_scale:g}, seeds {seed}..."
                                         f"{seed + len(prompts) - 1}")


def sara_overview_figure(weight=None, *, fraction: float = 0.25, grow: float = 0.35, size: int = 12,
                         seed: int = 0):
    """SaRA in one picture: four panels on one small weight matrix.

    1. the pretrained weights, with the smallest ``fraction`` of |w| (below θ) outlined;
    2. the sparse trainable mask M = (|w| < θ): only those entries get gradients;
    3. progressive adjustment: after some training a share (``grow``) of the trained
       entries has grown past θ and is frozen; the rest keeps training;
    4. the merged result W + ΔW⊙M: an ordinary dense matrix of the same shape, so the
       fine-tuned model is a plain model, and only the trained values need saving.

    ``weight``: any 2-D (or conv) tensor, e.g. a layer of the shipped model; a
    ``size`` x ``size`` corner is shown. Without it a random matrix stands in.
    The "training" in panels 3-4 is simulated with seeded random updates:
    the figure explains the mechanism, it is not a training result.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    if weight is None:
        w = rng.standard_normal((size, size)) * 0.05
    else:
        import torch

        w = torch.as_tensor(weight).detach().float().cpu().reshape(len(weight), -1).numpy()
        if w.shape[0] < size or w.shape[1] < size:
            raise ConfigError(f"weight {w.shape} is smaller than the {size}x{size} crop; pass a bigger layer or smaller size")
        w = w[:size, :size]
    theta = float(np.quantile(np.abs(w), fraction))
    mask = np.abs(w) < theta
    # simulated training: trainable entries move; some end up above θ
    delta = np.zeros_like(w)
    trained = np.flatnonzero(mask)
    grew = rng.choice(trained, size=max(1, int(round(grow * len(trained)))), replace=False)
    delta.flat[trained] = rng.standard_normal(len(trained)) * theta * 0.3
    delta.flat[grew] = np.sign(rng.standard_normal(len(grew))) * theta * rng.uniform(1.3, 2.5, len(grew))
    merged = w + delta * mask
    state = np.zeros_like(w, dtype=int)  # 0 frozen from the start, 1 keeps training, 2 grew past θ -> frozen
    state[mask] = 1
    state[mask & (np.abs(merged) >= theta)] = 2

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    vmax = float(np.abs(w).max())
    ax = axes[0]
    im = ax.imshow(np.abs(w), cmap="Greys", vmin=0, vmax=vmax)
    ys, xs = np.nonzero(mask)
    ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="tab:red", linewidths=1.2)
    ax.set_title(f"1. pretrained |w|\nred: smallest {fraction:.0%} (|w| < θ = {theta:.2g})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="|w| (weight units)")
    ax = axes[1]
    ax.imshow(mask, cmap=ListedColormap(["#dddddd", "tab:red"]), vmin=0, vmax=1)
    ax.set_title(f"2. sparse trainable mask M\n{mask.sum()} of {mask.size} entries train", fontsize=9)
    ax = axes[2]
    ax.imshow(state, cmap=ListedColormap(["#dddddd", "tab:red", "tab:blue"]), vmin=0, vmax=2)
    ax.set_title("3. progressive adjustment\nred: still < θ, keeps training;\nblue: grew past θ, now frozen",
                 fontsize=9)
    ax = axes[3]
    im = ax.imshow(merged, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.scatter(xs, ys, s=6, color="k")  # the entries that changed: the only ones saved
    ax.set_title(f"4. merged W + ΔW⊙M: a plain matrix\nsaved: only the {mask.sum()} trained values (dots)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="w (weight units)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("input index")
    axes[0].set_ylabel("output index")
    fig.suptitle("SaRA in one picture: train the weights that pretraining left (temporarily) ineffective", fontsize=11)
    fig.tight_layout()
    return fig


def strip_notebook_outputs(paths) -> list[Path]:
    """Remove outputs and execution counts from notebooks in place (atomic write); return the paths changed."""
    import nbformat

    from .io import atomic_write_bytes

    changed = []
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        dirty = False
        for cell in nb.cells:
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                cell.outputs, cell.execution_count = [], None
                dirty = True
            if cell.get("metadata", {}).pop("execution", None) is not None:
                dirty = True
        if dirty:
            atomic_write_bytes(path, lambda tmp: nbformat.write(nb, tmp))
            changed.append(path)
    return changed


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Course notebook helpers")
    p.add_argument("--strip", nargs="+", metavar="NOTEBOOK", help="remove outputs from these notebooks")
    p.add_argument("--env", action="store_true", help="print the environment report")
    a = p.parse_args(argv)
    if a.strip:
        for path in strip_notebook_outputs(a.strip):
            print(f"stripped {path}")
    if a.env or not a.strip:
        print(environment_report().to_string())


if __name__ == "__main__":
    main()
