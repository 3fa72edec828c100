"""Checkpoints of a training run, and resuming from the latest one.

A checkpoint is a folder ``step_000100/`` with three safetensors files (no
pickle anywhere): what the method trained (:meth:`TrainingMethod.trained_state`;
for SaRA only the trained entries), the optimizer's state, and the loop's own
state (step, learning-rate schedule, batch order and RNG, history so far), plus
``complete.json``: the SHA-256 of each file, a fingerprint of the base model's
weights and the run's settings. The folder is written under a temporary name
and renamed into place, so a run killed while saving leaves no half-written
checkpoint (:func:`sara_edu.io.atomic_folder`); resuming verifies the
checksums and refuses another base model or other settings, since either would
silently continue a different run.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..io import atomic_folder, file_sha256, load_state, load_tensors, save_state, save_tensors

_STEP_DIR = re.compile(r"step_(\d+)$")
MARKER = "complete.json"
FILES = ("trained.safetensors", "optimizer.safetensors", "loop.safetensors")


def save_checkpoint(root, *, step: int, method, unet, optimizer, scheduler, batches, history: list[dict],
                    keep: int | None = None, run: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` under ``root``; keep only the newest ``keep`` (None: all).

    ``run`` (``{"base_sha256": ..., "settings": {...}}``) is recorded for :func:`check_resume`.
    """
    folder = Path(root) / f"step_{step:06d}"
    with atomic_folder(folder) as tmp:
        save_tensors(method.trained_state(unet), tmp / FILES[0], {"method": method.name})
        save_state(optimizer.state_dict(), tmp / FILES[1])
        save_state({"step": step, "scheduler": scheduler.state_dict(), "batches": batches.state_dict(),
                    "torch_rng": torch.get_rng_state(), "history": history}, tmp / FILES[2])
        info = {"step": step, "method": method.name, "sha256": {f: file_sha256(tmp / f) for f in FILES}, **(run or {})}
        (tmp / MARKER).write_text(json.dumps(info))
    if keep is not None:
        for old in checkpoints(root)[:-keep]:
            (old / MARKER).unlink()  # first: a deletion cut short leaves an incomplete folder, never a "complete" one
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    return folder


def checkpoints(root) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def base_fingerprint(unet) -> str:
    """SHA-256 over every weight and buffer of ``unet`` (names, dtypes, shapes, bytes): which base a run trains."""
    from ..sara.sparse_file import _fingerprint

    h = hashlib.sha256()
    empty = torch.zeros(0, dtype=torch.int64)
    for name, t in unet.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{_fingerprint(t, empty)};".encode())
    return h.hexdigest()


def _marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / MARKER} is unreadable ({e}); delete {folder} to resume from the "
                              "previous checkpoint") from e


def check_resume(root, *, resume: bool, settings: dict, saving: bool = True) -> Path | None:
    """Before any work: the checkpoint to resume from (None: start afresh), or a clear error.

    ``resume`` with no complete checkpoint under ``root`` is refused (the user asked to continue
    something); so is starting afresh (``saving``) where another run's checkpoints lie, which
    would mix two runs in one folder; and resuming with other ``settings`` than the checkpoint's.
    ``settings`` names each value as the user gave it (``"--lr"`` for the command).
    """
    found = latest_checkpoint(root)
    if not resume:
        if saving and found is not None:
            raise CheckpointError(
                f"{root} already holds checkpoints of another run ({found.name}): pass --resume (resume=True) to "
                "continue it, or write this run elsewhere (a new --out / checkpoint_dir), or delete them first")
        return None
    if found is None:
        raise CheckpointError(f"--resume (resume=True) but {root} holds no complete checkpoint to resume from: "
                              "check the folder (--out), or run without --resume to start from step 0")
    saved = _marker(found).get("settings", {})
    given = json.loads(json.dumps(settings))  # as the marker stores them: tuples as lists, keys as text
    for name, value in given.items():
        if name in saved and saved[name] != value:
            raise ConfigError(f"{name}: the checkpoint {found} was saved with {saved[name]!r}, this run gives "
                              f"{value!r}. Resume with the same value ({name} {saved[name]!r}), or start a new "
                              "run in a new folder (a new --out / checkpoint_dir)")
    return found


def load_checkpoint(folder, *, method, unet, optimizer, scheduler, batches,
                    base_sha256: str | None = None) -> tuple[int, list[dict]]:
    """Restore a run from ``folder``; returns (the step it had finished, its history rows).

    ``method`` must already be attached to a fresh copy of the same base model
    (``build_optimizer``): its trained state is written into the weights first,
    then the optimizer's state (which, for SaRA, restores the masks). The files'
    checksums are verified first, and ``base_sha256`` (:func:`base_fingerprint` of
    the base before training) against the one recorded.
    """
    folder = Path(folder)
    if not (folder / MARKER).exists():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER}); resume from another one")
    saved = _marker(folder)
    if saved.get("method") != method.name:
        raise CheckpointError(f"{folder} was written by method {saved.get('method')!r}, not {method.name!r}: "
                              "resume with the method that started the run")
    if base_sha256 is not None and saved.get("base_sha256") not in (None, base_sha256):
        raise CheckpointError(
            f"{folder} was trained from another base model (weights SHA-256 {saved['base_sha256'][:12]}…, this "
            f"model's is {base_sha256[:12]}…): resume with the --model (a fresh copy of the base) that started the "
            "run, or start a new run in a new folder (a new --out / checkpoint_dir)")
    for name, digest in saved.get("sha256", {}).items():  # checkpoints of earlier versions recorded none
        if not (folder / name).exists() or file_sha256(folder / name) != digest:
            raise CheckpointError(f"{folder / name} is damaged or missing (its SHA-256 differs from the one "
                                  f"recorded when it was saved): delete {folder} to resume from the previous "
                                  "checkpoint, or start again")
    tensors, _ = load_tensors(folder / FILES[0])
    method.restore_trained_state(unet, tensors)
    optimizer.load_state_dict(load_state(folder / FILES[1]))
    loop = load_state(folder / FILES[2])
    scheduler.load_state_dict(loop["scheduler"])
    batches.load_state_dict(loop["batches"])
    torch.set_rng_state(loop["torch_rng"])
    return int(loop["step"]), list(loop["history"])
