"""Safe reading and writing of weights: safetensors only, atomic writes.

An interrupted save never leaves a half-written file: we write to a temporary
file in the same folder and ``os.replace`` it into place (atomic on POSIX and
Windows), so the old file stays intact until the new one is complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; saved weights are ordinary files
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: remove the partial file, keep the old one.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> Path:
    """Save a flat dict of tensors as safetensors, atomically.

    ``metadata`` values may be any JSON-serialisable object; they are stored
    as JSON strings in the safetensors header.
    """
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path) -> dict:
    """Read the JSON metadata of a safetensors file without loading tensors."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated or "
            "corrupt: re-create it (see README, 'Regenerating the data')."
        ) from e
    return {k: json.loads(v) for k, v in raw.items()}


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file, returning (tensors, metadata) with clear errors."""
    path = _existing(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-create it or restore it from git.") from e
    return tensors, meta


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist. Check the path, or run "
                              "`make data` to regenerate the shipped files.")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: sara-edu reads weights only from .safetensors files (never pickle).")
    return path


def describe_mismatch(model_shapes: dict, file_shapes: dict) -> str | None:
    """Why a file's tensors do not fit a model, in one sentence; None when names and shapes agree.

    Both arguments map tensor names to shapes. Used by every loader that checks a
    file against a model, so the messages read the same everywhere.
    """
    in_file_only = sorted(set(file_shapes) - set(model_shapes))
    in_model_only = sorted(set(model_shapes) - set(file_shapes))
    wrong = [k for k in file_shapes if k in model_shapes and tuple(file_shapes[k]) != tuple(model_shapes[k])]
    parts = []
    if in_file_only:
        parts.append(f"{len(in_file_only)} weights of the file are not in the model (e.g. {in_file_only[0]})")
    if in_model_only:
        parts.append(f"{len(in_model_only)} model weights are not in the file (e.g. {in_model_only[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shapes differ (e.g. {k}: file {tuple(file_shapes[k])} vs model "
                     f"{tuple(model_shapes[k])})")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- nested states (optimizer, scheduler, RNG)

_TENSOR_REF = "__tensor__"


def save_state(state, path, metadata: dict | None = None) -> Path:
    """Save a nested state (dicts, lists, tuples, numbers, strings, tensors) as one safetensors file.

    ``optimizer.state_dict()`` and friends are usually saved with ``torch.save``,
    i.e. pickle; here every tensor goes into the safetensors file and the
    structure around them into its JSON metadata, so loading runs no code.
    Tuples come back as lists, and dict keys as strings unless they were ints.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = obj.detach().cpu().contiguous()
            return {_TENSOR_REF: key}
        if isinstance(obj, dict):
            return {"__dict__": [[k, encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return [encode(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"save_state cannot store a {type(obj).__name__} ({obj!r:.60})")

    skeleton = encode(state)
    return save_tensors(tensors, path, {**(metadata or {}), "state": skeleton})


def load_state(path):
    """The nested state written by :func:`save_state` (tensors on the CPU)."""
    tensors, meta = load_tensors(path)
    if "state" not in meta:
        raise CheckpointError(f"{path} holds no saved state (it was not written by save_state)")

    def decode(obj):
        if isinstance(obj, dict):
            if _TENSOR_REF in obj:
                try:
                    return tensors[obj[_TENSOR_REF]]
                except KeyError as e:
                    raise CheckpointError(f"{path} is incomplete: tensor {e.args[0]} is missing") from e
            return {k: decode(v) for k, v in obj["__dict__"]}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(meta["state"])
