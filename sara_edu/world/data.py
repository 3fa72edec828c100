"""Data: the scikit-learn digits as tiny RGB images, the style sets, and image folders.

The base domain is the 1,797 handwritten digits that ship inside scikit-learn
(8x8, 17 grey levels), upsampled to 16x16. The split is fixed: a stratified
80/20 split with ``random_state=0`` (1,437 train, 360 held out), so every
notebook, test and study sees the same images.

A fine-tuning dataset yields ``{"pixel_values": (3, H, W) in [-1, 1], "prompt": str}``,
the same dict a diffusers training example uses. ``ImageFolderDataset`` reads the
paper's format (images + ``metadata.jsonl`` with ``file_name`` and ``text``), so a
user can point the same code at their own style folder.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .styles import LOOKS, apply_style
from .text import make_prompt

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
# Fine-tuning on a style uses these digits; the rest measure generalisation.
FINETUNE_DIGITS = (0, 1, 2, 3, 4, 5, 6)
UNSEEN_DIGITS = (7, 8, 9)


@lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    ink = torch.tensor(d.images, dtype=torch.float32) / 16.0
    ink = F.interpolate(ink[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)[:, 0]
    labels = torch.tensor(d.target)
    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=HELD_OUT_FRACTION, stratify=d.target, random_state=SPLIT_SEED)
    return ink.clamp(0, 1), labels, torch.tensor(np.sort(train)), torch.tensor(np.sort(held))


def load_digits_ink(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Ink maps (N, 16, 16) in [0, 1] and labels (N,) for ``split`` in {"train", "heldout", "all"}."""
    ink, labels, train, held = _digits()
    if split == "all":
        return ink, labels
    if split not in ("train", "heldout"):
        raise DataError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    idx = train if split == "train" else held
    return ink[idx], labels[idx]


def load_digits_images(split: str = "train", style: str | None = None, digits=None, seed: int = 0):
    """Images (N, 3, 16, 16) in [-1, 1], labels and prompts for one look."""
    ink, labels = load_digits_ink(split)
    if digits is not None:
        if isinstance(digits, (str, bytes)) or not isinstance(digits, Iterable) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in digits):
            raise DataError(f"digits must be a collection of integers 0..9 such as (0, 1, 2) or None, got {digits!r}")
        keep = torch.isin(labels, torch.tensor(list(digits)))
        ink, labels = ink[keep], labels[keep]
    if len(labels) == 0:
        raise DataError(f"no images for split={split!r}, digits={digits}")
    images = apply_style(ink, style, seed=seed)
    prompts = [make_prompt(int(k), style) for k in labels]
    return images, labels, prompts


class TensorImageDataset(Dataset):
    """Images + prompts held in memory, in the diffusers training-example format."""

    def __init__(self, images: torch.Tensor, prompts: list[str], labels: torch.Tensor | None = None):
        from .sampling import check_prompts

        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"images must be a tensor of shape (N, 3, H, W) in [-1, 1], got {got}")
        if len(images) == 0:
            raise DataError("the dataset is empty")
        prompts = check_prompts(prompts)
        if len(images) != len(prompts):
            raise DataError(f"{len(images)} images but {len(prompts)} prompts")
        self.images, self.prompts, self.labels = images, list(prompts), labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "prompt": self.prompts[i]}


class StyleDataset(TensorImageDataset):
    """One of the paper's five styles (or ``"plain"``) rendered on the digits.

    By default only :data:`FINETUNE_DIGITS` are used, so digits 7-9 stay unseen in
    the style and can measure generalisation. ``limit`` keeps the first images of
    each digit, like the paper's small (tens of images) style sets.
    """

    def __init__(self, style: str | None, split: str = "train", digits=FINETUNE_DIGITS,
                 limit_per_digit: int | None = None, seed: int = 0):
        from .sampling import check_int

        images, labels, prompts = load_digits_images(split, style, digits, seed)
        if limit_per_digit is not None:
            check_int(limit_per_digit, "limit_per_digit", 1, hint="images kept per digit, or None for all")
            keep = torch.cat([torch.nonzero(labels == k)[:limit_per_digit, 0] for k in labels.unique()])
            keep = keep.sort().values
            images, labels, prompts = images[keep], labels[keep], [prompts[i] for i in keep]
        super().__init__(images, prompts, labels)
        self.style = style or "plain"


def with_plain_prompts(dataset: TensorImageDataset, fraction: float = 0.5, seed: int = 0) -> TensorImageDataset:
    """The style set plus plain digits with plain prompts: the course's *prior preservation*.

    Fine-tuning on a style alone also changes what plain prompts draw: nothing in the data
    asks the model to keep them plain. DreamBooth's prior preservation mixes the model's
    old task into the new data; here the old task is the plain digits, so we add
    ``fraction`` x ``len(dataset)`` plain training images (all ten digits, ``"a digit k"``),
    drawn with ``seed``. ``fraction=0.5`` makes a third of the mixed set plain.
    """
    from .sampling import check_int

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 4:
        raise DataError(f"fraction must be a number in (0, 4] (plain images per style image), got {fraction!r}")
    check_int(seed, "seed", 0)
    plain = StyleDataset(None, digits=range(10))
    n = max(1, round(fraction * len(dataset)))
    if n > len(plain):
        raise DataError(f"fraction={fraction} asks for {n} plain images, but there are only {len(plain)}")
    pick = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed))[:n]
    labels = None
    if dataset.labels is not None and plain.labels is not None:
        labels = torch.cat([dataset.labels, plain.labels[pick]])
    return TensorImageDataset(torch.cat([dataset.images, plain.images[pick]]),
                              dataset.prompts + [plain.prompts[i] for i in pick], labels)


class ImageFolderDataset(TensorImageDataset):
    """A folder in the paper's format: image files + ``metadata.jsonl``.

    Each line of ``metadata.jsonl`` is ``{"file_name": "0001.png", "text": "a prompt"}``
    (the Hugging Face ``imagefolder`` convention the authors' datasets use), in UTF-8.
    Images of any Pillow mode are scaled by their own range (16-bit, float, alpha:
    see :mod:`sara_edu.world.image_files`), resized to ``size`` and mapped to [-1, 1].
    A bad line, a file name leaving the folder or an unreadable image raises
    :class:`DataError` naming the file and line.
    """

    def __init__(self, folder, size: int = IMAGE_SIZE, caption_column: str = "text"):
        from .image_files import image_path, read_metadata_rows, read_rgb
        from .sampling import check_int

        size = check_int(size, "size", 1, hint="the side in pixels images are resized to")
        if not isinstance(caption_column, str) or not caption_column:
            raise DataError(f"caption_column must be the name of the caption key, e.g. 'text', got {caption_column!r}")
        folder = Path(folder)
        meta = folder / "metadata.jsonl"
        if folder.is_file():
            raise DataError(f"image folder {folder} is a file, expected a folder holding the images and a "
                            f"metadata.jsonl: pass its folder ({folder.parent}) or the folder you meant")
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist")
        if not meta.exists():
            raise DataError(f"{folder} has no metadata.jsonl; add one line per image: "
                            '{"file_name": "0001.png", "text": "your caption"}')
        rows = read_metadata_rows(meta, caption_column)
        if not rows:
            raise DataError(f"{meta} lists no images; the folder is empty")
        images = []
        for name, _, n in rows:
            where = f"{meta}:{n}"
            rgb = read_rgb(image_path(folder, name, where), size, where)
            images.append(torch.from_numpy(rgb * 2 - 1).permute(2, 0, 1))
        super().__init__(torch.stack(images), [text for _, text, _ in rows])


def export_image_folder(dataset: TensorImageDataset, folder) -> Path:
    """Write a dataset as PNGs + ``metadata.jsonl`` (the paper's format)."""
    from PIL import Image

    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise DataError(f"export_image_folder needs a dataset such as StyleDataset(...), got {type(dataset).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(len(dataset)):
        item = dataset[i]
        arr = ((item["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        name = f"{i:05d}.png"
        Image.fromarray(arr).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": item["prompt"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


__all__ = ["LOOKS", "IMAGE_SIZE", "FINETUNE_DIGITS", "UNSEEN_DIGITS", "load_digits_ink", "load_digits_images",
           "TensorImageDataset", "StyleDataset", "ImageFolderDataset", "export_image_folder", "with_plain_prompts"]
