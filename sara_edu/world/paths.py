"""Where the shipped data lives: the course model, its checkpoints and the classifier.

Three places, first match wins:

1. ``SARA_EDU_DATA`` (an environment variable), for your own copy of ``data/``;
2. ``data/`` of a source checkout (``pip install -e .``, ``make lab``), so that
   ``make data`` regenerates what the course uses;
3. ``sara_edu/_data`` inside an installed wheel (``pip install .``): the build
   copies ``data/`` there, so the course works from any folder.
"""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent  # meaningful in a source checkout only


def _is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "data").is_dir()


def data_dir() -> Path:
    """The folder holding ``tiny_diffusion/`` and ``classifier/`` (see the module docstring)."""
    override = os.environ.get("SARA_EDU_DATA")
    if override is not None:
        return Path(override)
    if _is_checkout(REPO_ROOT):
        return REPO_ROOT / "data"
    return PACKAGE_DIR / "_data"


DATA_DIR = data_dir()
PRETRAINED_DIR = DATA_DIR / "tiny_diffusion"
CLASSIFIER_PATH = DATA_DIR / "classifier" / "classifier.safetensors"
