"""Checkpoints of a training run, and resuming from the latest one.

A checkpoint is a folder ``step_000100/`` with three safetensors files (no
pickle anywhere): what the method trained (:meth:`TrainingMethod.trained_state`;
for SaRA only the trained entries), the optimizer's state, and the loop's own
state (step, learning-rate schedule, batch order and RNG, history so far). A
``complete.json`` written last marks it usable, so a run killed while saving
resumes from the previous checkpoint instead of a half-written one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import atomic_write_bytes, load_state, load_tensors, save_state, save_tensors

_STEP_DIR = re.compile(r"step_(\d+)$")
MARKER = "complete.json"


def save_checkpoint(root, *, step: int, method, unet, optimizer, scheduler, batches, history: list[dict],
                    keep: int | None = None) -> Path:
    """Write the checkpoint of ``step`` under ``root``; keep only the newest ``keep`` (None: all)."""
    folder = Path(root) / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(method.trained_state(unet), folder / "trained.safetensors", {"method": method.name})
    save_state(optimizer.state_dict(), folder / "optimizer.safetensors")
    save_state({"step": step, "scheduler": scheduler.state_dict(), "batches": batches.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": history}, folder / "loop.safetensors")
    info = json.dumps({"step": step, "method": method.name}).encode()
    atomic_write_bytes(folder / MARKER, lambda tmp: Path(tmp).write_bytes(info))
    if keep is not None:
        for old in checkpoints(root)[:-keep]:
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


def load_checkpoint(folder, *, method, unet, optimizer, scheduler, batches) -> tuple[int, list[dict]]:
    """Restore a run from ``folder``; returns (the step it had finished, its history rows).

    ``method`` must already be attached to a fresh copy of the same base model
    (``build_optimizer``): its trained state is written into the weights first,
    then the optimizer's state (which, for SaRA, restores the masks).
    """
    folder = Path(folder)
    if not (folder / MARKER).exists():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER}); resume from another one")
    saved = json.loads((folder / MARKER).read_text())
    if saved.get("method") != method.name:
        raise CheckpointError(f"{folder} was written by method {saved.get('method')!r}, not {method.name!r}: "
                              "resume with the method that started the run")
    tensors, _ = load_tensors(folder / "trained.safetensors")
    method.restore_trained_state(unet, tensors)
    optimizer.load_state_dict(load_state(folder / "optimizer.safetensors"))
    loop = load_state(folder / "loop.safetensors")
    scheduler.load_state_dict(loop["scheduler"])
    batches.load_state_dict(loop["batches"])
    torch.set_rng_state(loop["torch_rng"])
    return int(loop["step"]), list(loop["history"])
