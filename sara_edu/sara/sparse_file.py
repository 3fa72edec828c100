"""The sparse file format: save only what trained, load it into the same base.

A safetensors file holds, per trained weight, ``<name>::indices`` (flat
positions, int32 when they fit) and ``<name>::values``; its metadata records
every parameter's name, shape and a fingerprint of the untouched base weights,
so :func:`load_sparse` refuses a different base instead of producing a
silently wrong model. Writes are atomic (:mod:`sara_edu.io`).
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import describe_mismatch, load_tensors, save_tensors
from .attach import attached_owner, flat_view, optimizer_of
from .selection import index_dtype_for

SPARSE_FORMAT = "sara-edu-sparse/1"


def _fingerprint(p: torch.Tensor, trained: torch.Tensor) -> list:
    """``[sum |w| (float64), hash of 64 sampled values]`` over the entries that did NOT train.

    Those entries are the base model's, so a fresh copy of the same base gives
    the same fingerprint while any other base (weights or shapes) does not.
    """
    flat = p.detach().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[trained] = False
    frozen = flat[keep]
    abs_sum = float(frozen.double().abs().sum()) if frozen.numel() else 0.0
    k = min(64, frozen.numel())  # evenly spaced positions, in integers (float32 linspace rounds past 2**24)
    pos = torch.arange(k, device=flat.device, dtype=torch.int64) * max(frozen.numel() - 1, 0) // max(k - 1, 1)
    sample = frozen[pos].float().cpu().numpy().tobytes()
    return [abs_sum, hashlib.sha1(sample).hexdigest()[:16]]


@torch.no_grad()
def save_sparse(obj, path, metadata: dict | None = None):
    """Save only what trained: per weight its flat positions and trained values.

    ``obj``: a :class:`SaRAAdamW`, a :class:`SaRA` / ``SelectiveFineTuning``
    method, or a model with one attached. The file is a safetensors file
    (``<name>::indices`` int32/int64 and ``<name>::values``), written
    atomically, whose metadata records every parameter's name, shape and a
    fingerprint of the untouched base weights for :func:`load_sparse`.
    """
    opt = optimizer_of(obj)
    model = opt.model
    trained = {k: v for k, v in opt.trained_entries().items()}
    tensors, params = {}, {}
    for name, p in model.named_parameters():
        idx = trained.get(name)
        if idx is None:
            idx = torch.zeros(0, dtype=torch.int64, device=p.device)
        params[name] = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                        "trained": int(idx.numel()), "fingerprint": _fingerprint(p, idx)}
        if idx.numel():
            tensors[f"{name}::indices"] = idx.to(index_dtype_for(p.numel()))
            tensors[f"{name}::values"] = p.detach().reshape(-1).index_select(0, idx)
    meta = {"format": SPARSE_FORMAT, "config": opt.config(), "params": params, **(metadata or {})}
    return save_tensors(tensors, path, meta)


@torch.no_grad()
def load_sparse(model, path, check_base: bool = True) -> nn.Module:
    """Write the trained entries of a :func:`save_sparse` file into ``model`` (in place).

    ``model`` must be a fresh copy of the base the file was trained from (or
    the trained model itself): other parameter names, shapes or base weights
    raise :class:`CheckpointError`. ``check_base=False`` skips the weight
    fingerprint (names and shapes are always checked). Returns ``model``.
    """
    model = getattr(model, "unet", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load_sparse needs an nn.Module (e.g. pipe.unet), got {type(model).__name__}")
    if attached_owner(model) is not None:
        raise ConfigError("SaRA is attached to this model: detach it (sara_edu.sara.detach(model)) before "
                          "loading a sparse file into it")
    tensors, meta = load_tensors(path)
    if meta.get("format") != SPARSE_FORMAT:
        raise CheckpointError(f"{path} is not a sara-edu sparse file (format {meta.get('format')!r}); "
                              "full checkpoints load with load_pretrained / load_state_dict")
    saved = meta["params"]
    own = dict(model.named_parameters())
    problem = describe_mismatch({n: p.shape for n, p in own.items()}, {n: v["shape"] for n, v in saved.items()})
    if problem:
        raise CheckpointError(f"{path} was trained on a different model: {problem}. Load it into the "
                              "base model it was trained from.")
    updates = {}
    for name, info in saved.items():
        p = own[name]
        if info["trained"]:
            try:
                idx, values = tensors[f"{name}::indices"], tensors[f"{name}::values"]
            except KeyError as e:
                raise CheckpointError(f"{path} is incomplete: no {e.args[0]}") from e
            if idx.dtype not in (torch.int32, torch.int64) or idx.numel() != values.numel() or (
                    idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel())):
                raise CheckpointError(f"{path} is corrupt: bad indices/values for {name}")
            idx = idx.to(p.device)
        else:
            idx, values = torch.zeros(0, dtype=torch.int64, device=p.device), None
        if check_base:
            have = _fingerprint(p, idx)
            want = info["fingerprint"]
            if have[1] != want[1] or not math.isclose(have[0], want[0], rel_tol=1e-9, abs_tol=1e-12):
                raise CheckpointError(
                    f"{path} was trained from different base weights: the untouched entries of {name} differ "
                    f"(sum |w| {have[0]:.6g} in the model vs {want[0]:.6g} in the file). Load it into a fresh copy "
                    "of the same pretrained model (same checkpoint), or pass check_base=False if you really "
                    "mean to transplant the trained entries.")
        if values is not None:
            updates[name] = (idx, values)
    for name, (idx, values) in updates.items():
        p = own[name]
        flat_view(p)[idx] = values.to(p.device, p.dtype)
    return model
