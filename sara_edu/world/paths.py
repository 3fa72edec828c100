"""Where the shipped data lives: the course model, its checkpoints and the classifier.

Three places, first match wins:

1. ``SARA_EDU_DATA`` (an environment variable, read once at import), for your own
   copy of ``data/``; :func:`check_data_dir` refuses it empty or naming no folder;
2. ``data/`` of a source checkout (``pip install -e .``, ``make lab``), so that
   ``make data`` regenerates what the course uses;
3. ``sara_edu/_data`` inside an installed wheel (``pip install .``): the build
   copies ``data/`` there, so the course works from any folder.
"""
import os
from pathlib import Path

from ..errors import ConfigError, DataError

DATA_ENV = "SARA_EDU_DATA"
_AT_IMPORT = os.environ.get(DATA_ENV)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent  # meaningful in a source checkout only


def _is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "data").is_dir()


def data_dir() -> Path:
    """The folder holding ``tiny_diffusion/`` and ``classifier/`` (see the module docstring)."""
    override = os.environ.get(DATA_ENV)
    if override is not None:
        return Path(override)
    if _is_checkout(REPO_ROOT):
        return REPO_ROOT / "data"
    return PACKAGE_DIR / "_data"


DATA_DIR = data_dir()
PRETRAINED_DIR = DATA_DIR / "tiny_diffusion"
CLASSIFIER_PATH = DATA_DIR / "classifier" / "classifier.safetensors"


def check_data_dir() -> Path:
    """``DATA_DIR``, once ``SARA_EDU_DATA`` is known to name a folder; call it where shipped data is first read.

    An empty or missing folder would otherwise surface as "no config.json in
    tiny_diffusion", which hides that the variable is to blame.
    """
    value = _AT_IMPORT
    if value is not None:
        if not value.strip():
            raise DataError(f"{DATA_ENV} is set to an empty string. Unset it (`unset {DATA_ENV}`, or "
                            f"del os.environ['{DATA_ENV}'] before importing sara_edu) to use the shipped data, or set "
                            "it to the folder that holds tiny_diffusion/ and classifier/.")
        if not Path(value).is_dir():
            tilde = " (~ is not expanded: write the full path)" if value.startswith("~") else ""
            raise DataError(f"{DATA_ENV}={value!r} is not an existing folder{tilde}. Point it at the folder that "
                            f"holds tiny_diffusion/ and classifier/, or unset it to use the shipped data.")
    now = os.environ.get(DATA_ENV)
    if now != value:
        raise ConfigError(f"{DATA_ENV} changed from {value!r} to {now!r} after sara_edu was imported, but the data "
                          "paths follow the value at import: set it before importing (or restart the kernel).")
    return DATA_DIR
