"""Safe reading and writing of weights: safetensors only, atomic writes.

An interrupted save never leaves a half-written file: we write into a hidden
private temporary folder ``.<name>.<random>.tmp/`` next to the target and
``os.replace`` the finished file into place (atomic on POSIX and Windows), so
the old file stays intact until the new one is complete. The folder, not a
file, because writers such as safetensors' ``save_file`` write to their own
temporary file (``.tmpXXXXXX``, as large as the result) beside the path they
are given: inside our folder, it is ours to clean. A save killed outright
(``kill -9``, a lost kernel) cannot remove its temporary folder; the next save
of the same path does, once it is sure no live writer owns it: the writer holds
an exclusive ``flock`` on the folder while writing (a dead process holds none)
and nothing in it is newer than this process. Temporary *files* of that name,
as earlier versions wrote them, are cleaned the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

try:  # POSIX; on Windows an open file cannot be deleted, which protects a live writer just as well
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_PROCESS_START = time.time()


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    ``tmp_path`` has ``path``'s name, inside a private temporary folder next to
    ``path`` that is removed afterwards, with whatever ``write`` left in it.
    Stale temporaries of ``path`` left by a killed save are removed first (see
    the module docstring for why that is safe).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    fd = None
    if fcntl is not None:
        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks the folder as owned by a live writer until we close it
    tmp = os.path.join(folder, path.name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # files in a 0700 folder may be 0600; saved weights are ordinary files
        os.replace(tmp, path)
    finally:
        # KeyboardInterrupt included: remove the partial file (and any writer's own temporary), keep the old one.
        shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            os.close(fd)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """``with atomic_folder(path) as tmp:`` fill the folder ``tmp``; on success it becomes ``path``.

    ``tmp`` is a private, locked temporary folder beside ``path`` (cleaned like
    :func:`atomic_write_bytes`'s when a run is killed), so ``path`` appears
    complete or not at all; an older folder at ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd = None
    if fcntl is not None:
        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    old = None
    try:
        yield folder
        os.chmod(folder, 0o755)  # mkdtemp makes 0700 folders
        if path.exists():  # moved aside under a temporary's name, so a kill here leaves nothing half-written
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.*.tmp`` folders (or files) a killed save of ``path`` left behind; returns what was removed.

    Only entries named exactly as :func:`atomic_write_bytes` names them, with
    nothing in them modified since this process started, and not locked by a
    writer are removed.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        candidates = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if tmp.is_symlink() or not (tmp.is_file() or tmp.is_dir()) or _last_modified(tmp) >= _PROCESS_START:
                continue
            if _owned_by_a_live_writer(tmp):
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    return removed


def _last_modified(tmp: Path) -> float:
    """The newest modification time of ``tmp`` and, for a folder, of what is in it (a writer may still write)."""
    times = [tmp.stat().st_mtime]
    if tmp.is_dir():
        times += [p.lstat().st_mtime for p in tmp.iterdir()]
    return max(times)


def _owned_by_a_live_writer(tmp: Path) -> bool:
    if fcntl is None:
        return False  # Windows refuses to delete a file another process has open
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may have taken
    return False


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
    return {k: _json_or_text(v) for k, v in raw.items()}


def _json_or_text(value: str):
    """sara-edu stores JSON; diffusers and transformers store plain text such as ``{"format": "pt"}``."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


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
    if path.is_dir():
        inside = sorted(path.glob("*.safetensors"))
        hint = f" (e.g. {inside[0]})" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a file: pass the .safetensors file to read{hint}.")
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
    if isinstance(meta["state"], str):  # metadata that is not JSON comes back as text: damaged
        raise CheckpointError(f"{path} has damaged metadata: its saved state is not valid JSON. Restore the file.")

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

    try:
        return decode(meta["state"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # tampered structure: say so, never a bare KeyError
        raise CheckpointError(f"{path} has damaged metadata: its saved state does not have the structure "
                              f"save_state writes ({type(e).__name__}: {e}). Restore the file.") from e
