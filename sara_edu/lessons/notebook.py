"""Conventions shared by every course notebook.

* **QUICK vs full.** ``SARA_EDU_QUICK=1`` (what CI sets) makes every notebook
  run in a few minutes on a 2-core CPU with fewer steps and samples; without it
  the notebooks use the settings whose results a teacher would show. Notebooks
  never test ``QUICK`` themselves: they write ``steps = choose(quick=5, full=25)``
  so both values are visible side by side in the cell.
* **Set-up.** A notebook's first code cell ends with :func:`setup_notebook`, which
  seeds Python, NumPy and torch, sets display defaults and prints the setting.
* **Timing.** ``with timed("generation"):`` prints how long a cell took, so the
  notebooks can state (measured, not guessed) what the full setting costs.
* :func:`environment_report` says what the notebook is running on.
* **Anywhere.** A notebook opened outside the repository (a hosted Jupyter, a fresh
  folder) first imports ``sara_edu`` inside ``try``; without it the cell stops with one
  message naming the ``pip install`` command. :func:`locate_course` (called by
  :func:`setup_notebook`) then says which ``sara_edu`` and which shipped model the
  notebook uses, or what to do when the model is missing.
* **Saved output stays readable.** :func:`setup_notebook` switches ``tqdm`` progress
  bars to plain text (:func:`use_text_progress_bars`): a widget bar saved in a notebook
  shows "Error displaying widget" once the kernel is gone.

Committed notebooks carry no outputs; ``python -m sara_edu.lessons.notebook --strip
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

from ..errors import CheckpointError, ConfigError

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


#: The widest printed line. JupyterLab's notebook column holds about 100 characters of output (laptop screen,
#: file browser open); a longer line wraps wherever the browser breaks it, often in the middle of a word.
PRINT_WIDTH = 100


def wrap(text: str, width: int = PRINT_WIDTH) -> str:
    """``text`` with each line longer than ``width`` broken between words (continuations indented by 2 spaces).
    A single word longer than ``width`` (a long path) stays whole."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) if len(line) > width else line
                     for line in str(text).split("\n"))


def say(*parts, sep: str = " ") -> None:
    """``print`` for notebook cells, with lines wrapped between words at :data:`PRINT_WIDTH`."""
    print(wrap(sep.join(map(str, parts))))


def setting_banner(**values) -> str:
    """The setting in use and its values, e.g. for the top of a notebook (wrapped at :data:`PRINT_WIDTH`)."""
    name = ("QUICK setting (for CI and a first look; unset SARA_EDU_QUICK for the full one)" if is_quick()
            else "FULL setting (set SARA_EDU_QUICK=1 for a quick run)")
    details = ", ".join(f"{k}={v}" for k, v in values.items())
    return wrap(f"{name}" + (f": {details}" if details else ""))


def setup_notebook(seed: int = 0, *, needs_model: bool = True, **setting) -> None:
    """The first call of every course notebook: seed everything, set readable display
    defaults (pandas shows 4 significant digits, figures a legible size), draw progress
    bars as text, print which setting (QUICK or full) runs with which values
    (:func:`setting_banner`) and where the course comes from (:func:`locate_course`;
    ``needs_model=False`` for a notebook that does not use the shipped model).

        STEPS = course.choose(quick=10, full=25)
        course.setup_notebook(steps=STEPS)
    """
    import matplotlib as mpl
    import pandas as pd

    where = locate_course(needs_model=needs_model)  # first: a missing model is the one thing to fix
    seed_everything(seed)
    use_text_progress_bars()
    pd.set_option("display.float_format", "{:.4g}".format)
    pd.set_option("display.max_columns", 20)
    pd.set_option("display.width", 140)
    pd.set_option("display.max_colwidth", 60)
    mpl.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "axes.titlesize": 10, "axes.labelsize": 9})
    print(setting_banner(**setting))  # printed, not returned: a returned str would show twice in the cell
    print(where)


def locate_course(*, needs_model: bool = True) -> str:
    """Which ``sara_edu`` this kernel imports and where its shipped model is, one line each (two paths on one
    line would pass the 100 characters a notebook column shows wherever the course lies deep).

    Raises :class:`~sara_edu.errors.CheckpointError` with what to do when the shipped
    model is not where the package looks for it (and ``needs_model``): a notebook
    should stop at its first cell with that message, not fail later with a missing file.
    """
    from importlib.metadata import PackageNotFoundError, version

    from ..world.paths import PRETRAINED_DIR, check_data_dir

    if needs_model:
        check_data_dir()  # a SARA_EDU_DATA naming no folder is the thing to fix, not a missing file inside it
    package = Path(__file__).resolve().parents[1]
    try:
        release = version("sara-edu")
    except PackageNotFoundError:  # imported from a checkout on sys.path, not installed
        release = "not installed, imported from a folder"
    model = Path(PRETRAINED_DIR)
    missing = [name for name in ("config.json", "unet.safetensors", "text_encoder.safetensors")
               if not (model / name).is_file()]
    if missing and needs_model:
        raise CheckpointError(
            f"the shipped course model is not in {model} (missing: {', '.join(missing)}). Install the course "
            "with `%pip install sara-edu` and restart the kernel (the package carries the model), or in a clone "
            "of the repository run `make data`; or set SARA_EDU_DATA to a folder that holds tiny_diffusion/.")
    found = "missing" if missing else str(model)
    return f"sara_edu {release} from {package}\ncourse model: {found}"


def use_text_progress_bars() -> None:
    """Make ``tqdm.auto`` (what the training loop and the metrics use) draw plain-text bars on stdout.

    In a notebook ``tqdm.auto`` draws a widget. Saved and reopened without the kernel, every
    such bar becomes "Error displaying widget: model not found"; a text bar is ordinary output
    that stays readable (and a bar with ``leave=False`` leaves nothing behind).
    """
    import tqdm.auto
    from tqdm.asyncio import tqdm as text_tqdm

    class TextProgressBar(text_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("file", sys.stdout)  # stderr would be shown as a warning-coloured block
            kwargs.setdefault("ncols", 100)
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = TextProgressBar  # tqdm.auto.trange builds on this name too


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
    """What this notebook runs on, as a one-column table (index: item, column ``value``).

    Device, library versions, the GPU if any, where the shipped model lives and
    whether it is there, and the QUICK setting. Read it before asking "why is
    mine slower / different?".
    """
    import pandas as pd
    import torch

    from ..world.paths import PRETRAINED_DIR

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
    # a DataFrame, not a Series: Jupyter draws it as a table, a Series as text ending in "dtype: object"
    return pd.DataFrame({"value": pd.Series(report, dtype=object)}).rename_axis("item")


def strip_notebook_outputs(paths) -> list[Path]:
    """Remove outputs, execution counts and saved widget state from notebooks in place (atomic write);
    return the paths changed. (``make lab`` saves widget state with a notebook, see the Makefile.)"""
    import nbformat

    from ..io import atomic_write_bytes

    changed = []
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        dirty = nb.metadata.pop("widgets", None) is not None
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
