"""Reading an image folder in the paper's format: ``metadata.jsonl`` and image files of any mode.

Two things go silently wrong with a plain ``Image.open(p).convert("RGB")``:
16-bit images (PNG ``I;16``, ...) are clipped to 255 and come out white, and
float images (TIFF ``F``) are truncated to 0 and come out black. Here every
image is scaled by the range its mode stores:

=========================  ====================================================
mode                       read as
=========================  ====================================================
8-bit (``L``, ``P``,       ``value / 255``; Pillow converts palette, CMYK and
``RGB``, ``CMYK``, ...)    the other 8-bit modes to RGB
16-bit (``I;16*``)         ``value / 65535``
32-bit integer (``I``)     ``value / 65535`` (Pillow stores 16-bit data there);
                           values outside 0..65535 are an error
float (``F``)              as is; values must lie in [0, 1] (NaN or a value
                           outside is an error: rescale the file)
with alpha (``RGBA``,      composited over white, as a viewer shows them
``LA``, ``PA``, ``P`` +    (the colour under a transparent pixel is arbitrary)
transparency)
=========================  ====================================================

Grey images are repeated on the three channels; EXIF orientation is applied,
as a photo viewer does. ``file_name`` must be a relative path inside the
folder: absolute paths and ``..`` leaving it are refused, so a metadata file
can never make us read elsewhere (symlinks inside the folder are followed:
the Hugging Face cache stores its files that way).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def read_metadata_rows(meta: Path, caption_column: str = "text") -> list[tuple[str, str, int]]:
    """``(file_name, caption, line number)`` for every line of ``metadata.jsonl`` (UTF-8, BOM allowed)."""
    data = meta.read_bytes()
    if data.startswith(_UTF16_BOMS):
        raise DataError(f"{meta} is UTF-16 text; save it as UTF-8 (one JSON object per line)")
    data = data.removeprefix(_UTF8_BOM)  # Windows editors write one; it is not part of the first line
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{meta}:{n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "save metadata.jsonl as UTF-8") from e
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}:{n} is not valid JSON ({e.msg}): {line[:80]!r}") from e
        if not isinstance(row, dict):
            raise DataError(f"{meta}:{n} must be a JSON object like "
                            f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}, got {line[:80]!r}')
        for key in ("file_name", caption_column):
            value = row.get(key)
            if key not in row:
                raise DataError(f"{meta}:{n} has no '{key}' key (it has {sorted(row)}): {line[:80]!r}")
            if not isinstance(value, str) or (key == "file_name" and not value.strip()):
                raise DataError(f"{meta}:{n}: '{key}' must be a non-empty string"
                                if key == "file_name" else f"{meta}:{n}: '{key}' must be a string (the caption)")
        rows.append((row["file_name"], row[caption_column], n))
    return rows


def image_path(folder: Path, file_name: str, where: str) -> Path:
    """``folder / file_name``, refusing names that leave the folder (``where`` says which line)."""
    if Path(file_name).is_absolute() or Path(file_name).drive:
        raise DataError(f"{where}: file_name {file_name!r} is an absolute path; write it relative to {folder}")
    if os.path.normpath(file_name).split(os.sep)[0] == os.pardir:
        raise DataError(f"{where}: file_name {file_name!r} points outside {folder} (via '..'); image folders "
                        "only read their own files: copy the image into the folder")
    return folder / file_name


def read_rgb(path: Path, size: int, where: str) -> np.ndarray:
    """The image at ``path`` as float32 (size, size, 3) in [0, 1] (see the module docstring for modes)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here, with its name
            img = ImageOps.exif_transpose(img)
            rgb = _to_unit_rgb(img, path)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{where} names {path.name}, which is not in {path.parent}") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path} ({where}) is not an image file Pillow can read") from e
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        # OSError covers truncated data ("image file is truncated"), directories and permissions.
        raise DataError(f"{path} ({where}) cannot be read: {e}. It may be truncated or corrupt: "
                        "re-export it or remove its line from metadata.jsonl") from e
    if rgb.shape[:2] != (size, size):
        rgb = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F")
                                   .resize((size, size), Image.BICUBIC)) for c in range(3)], axis=-1)
        rgb = np.clip(rgb, 0.0, 1.0)  # bicubic overshoots at edges, as it does in 8 bits
    return rgb.astype(np.float32, copy=False)


def _to_unit_rgb(img, path: Path) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path} is a 32-bit integer image with values {values.min()}..{values.max()}; "
                            "sara-edu reads integer images as 0..65535 (16-bit). Save it as 8- or 16-bit PNG")
        grey = values.astype(np.float32) / 65535.0
    elif mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(grey)
        if not finite.all():
            raise DataError(f"{path} is a float image with {int((~finite).sum())} NaN or infinite pixels")
        if grey.size and (grey.min() < 0 or grey.max() > 1):
            raise DataError(f"{path} is a float image with values {grey.min():.4g}..{grey.max():.4g}; float "
                            "images must hold [0, 1]. Rescale it (e.g. divide by its maximum) or save it as PNG")
    else:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(grey[..., None], 3, axis=-1)
