"""Where the shipped data lives (``data/`` at the repository root).

Override with the ``SARA_EDU_DATA`` environment variable.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("SARA_EDU_DATA", REPO_ROOT / "data"))
PRETRAINED_DIR = DATA_DIR / "tiny_diffusion"
CLASSIFIER_PATH = DATA_DIR / "classifier" / "classifier.safetensors"
