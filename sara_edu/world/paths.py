"""Where the shipped data lives (``data/`` at the repository root).

Override with the ``SARA_EDU_DATA`` environment variable (read once, at import).
"""
import os
from pathlib import Path

from ..errors import ConfigError, DataError

DATA_ENV = "SARA_EDU_DATA"
_AT_IMPORT = os.environ.get(DATA_ENV)
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get(DATA_ENV, REPO_ROOT / "data"))
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
