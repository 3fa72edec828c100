"""The sparse file format: save only what trained, load it into the same base.

A safetensors file holds, per trained weight, ``<name>::indices`` (flat
positions, int32 when they fit) and ``<name>::values``. Its metadata records,
for every parameter, its name, shape and dtype, how many entries trained, and

* ``base_sha256``: a SHA-256 of the parameter's bytes in its own dtype with the
  trained positions zeroed, i.e. of every untouched base value and where it
  sits. :func:`load_sparse` recomputes it on the model and refuses any
  difference, a sign flip or one ulp included, instead of producing a silently
  wrong model. It costs one pass over the weights (0.6 GB/s of CPU time on the
  2-core dev box, faster than the first format: ``benchmarks/sparse_fingerprint.py``);
* ``indices_sha256`` / ``values_sha256``: SHA-256s of the stored tensors, so a
  file damaged after saving (flipped bits, a bad copy) is refused, and
  non-finite stored values are refused in any case.

Files of the first format (``sara-edu-sparse/1``, a weaker ``sum |w|`` + sample
fingerprint and no checksums) still load, checked the old way. Bytes are hashed
in the machine's byte order (little-endian on every platform PyTorch ships for).
Writes are atomic (:mod:`sara_edu.io`).
"""
from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import describe_mismatch, load_tensors, save_tensors
from .attach import attached_owner, flat_view, optimizer_of
from .selection import index_dtype_for

SPARSE_FORMAT = "sara-edu-sparse/2"
LEGACY_FORMATS = ("sara-edu-sparse/1",)
RESERVED_METADATA = ("format", "config", "params")  # written by save_sparse itself
_CHUNK = 1 << 24  # elements hashed at a time: bounded extra memory (64 MB for float32), any device
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(p: torch.Tensor, trained: torch.Tensor) -> str:
    """SHA-256 of ``p``'s bytes (own dtype, row-major) with the ``trained`` flat positions set to 0.

    That is a hash of every untouched (base) value together with its position:
    a fresh copy of the same base gives the same digest, any other bit does not.
    Works chunk by chunk, so the extra memory is one chunk whatever the size.
    """
    flat = p.detach().reshape(-1)
    trained = trained.reshape(-1).to(device="cpu", dtype=torch.int64)
    if trained.numel() > 1 and not bool((trained[1:] >= trained[:-1]).all()):
        trained = trained.sort().values
    h = hashlib.sha256()
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        chunk = flat[start:stop].to("cpu", copy=True)
        lo, hi = torch.searchsorted(trained, torch.tensor([start, stop])).tolist()
        if hi > lo:  # zero the bytes through an integer view: fast for every float dtype
            chunk.view(_SAME_SIZE_INT[chunk.element_size()])[trained[lo:hi] - start] = 0
        h.update(chunk.view(torch.uint8).numpy())
    return h.hexdigest()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _legacy_fingerprint(p: torch.Tensor, trained: torch.Tensor) -> list:
    """The ``sara-edu-sparse/1`` fingerprint: ``[sum |w| (float64), hash of 64 sampled values]``."""
    flat = p.detach().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[trained] = False
    frozen = flat[keep]
    abs_sum = float(frozen.double().abs().sum()) if frozen.numel() else 0.0
    k = min(64, frozen.numel())
    pos = torch.arange(k, device=flat.device, dtype=torch.int64) * max(frozen.numel() - 1, 0) // max(k - 1, 1)
    sample = frozen[pos].float().cpu().numpy().tobytes()
    return [abs_sum, hashlib.sha1(sample).hexdigest()[:16]]


@torch.no_grad()
def save_sparse(obj, path, metadata: dict | None = None):
    """Save only what trained: per weight its flat positions and trained values.

    ``obj``: a :class:`SaRAAdamW`, a :class:`SaRA` / ``SelectiveFineTuning``
    method, or a model with one attached. The file is a safetensors file
    (``<name>::indices`` int32/int64 and ``<name>::values``), written
    atomically, whose metadata records every parameter's name, shape, dtype, an
    exact fingerprint of the untouched base weights and checksums of the stored
    tensors, for :func:`load_sparse`. Values must be finite (a diverged run is
    refused rather than saved).
    """
    clash = sorted(set(metadata or {}) & set(RESERVED_METADATA))
    if clash:  # they would overwrite what load_sparse reads, and it would refuse the file later
        raise ConfigError(f"save_sparse metadata may not use the reserved key(s) {', '.join(map(repr, clash))} "
                          f"(the file's own {', '.join(RESERVED_METADATA)}); store your information under "
                          "other names, e.g. 'run_format'")
    opt = optimizer_of(obj)
    model = opt.model
    trained = dict(opt.trained_entries())
    tensors, params = {}, {}
    for name, p in model.named_parameters():
        idx = trained.get(name)
        if idx is None:
            idx = torch.zeros(0, dtype=torch.int64, device=p.device)
        info = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "trained": int(idx.numel()),
                "base_sha256": _fingerprint(p, idx)}
        if idx.numel():
            indices = idx.to(index_dtype_for(p.numel()))
            values = p.detach().reshape(-1).index_select(0, idx)
            if not bool(torch.isfinite(values).all()):
                raise CheckpointError(f"{name} has {int((~torch.isfinite(values)).sum())} NaN or infinite trained "
                                      "values: the run diverged. Not saving it; lower the learning rate and retrain.")
            tensors[f"{name}::indices"], tensors[f"{name}::values"] = indices, values
            info["indices_sha256"], info["values_sha256"] = _tensor_sha256(indices), _tensor_sha256(values)
        params[name] = info
    meta = {"format": SPARSE_FORMAT, "config": opt.config(), "params": params, **(metadata or {})}
    return save_tensors(tensors, path, meta)


@torch.no_grad()
def load_sparse(model, path, check_base: bool = True) -> nn.Module:
    """Write the trained entries of a :func:`save_sparse` file into ``model`` (in place).

    ``model`` must be a fresh copy of the base the file was trained from (or
    the trained model itself), in the dtype it was trained in: other parameter
    names, shapes, dtypes or base weights raise :class:`CheckpointError`, and
    so does a damaged file. ``check_base=False`` skips the base-weight and dtype
    checks (names, shapes and the file's own checksums are always checked);
    the trained values are then cast to the model's dtype. Returns ``model``.
    """
    model = getattr(model, "unet", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load_sparse needs an nn.Module (e.g. pipe.unet), got {type(model).__name__}")
    if attached_owner(model) is not None:
        raise ConfigError("SaRA is attached to this model: detach it (sara_edu.sara.detach(model)) before "
                          "loading a sparse file into it")
    tensors, meta = load_tensors(path)
    fmt = meta.get("format")
    if fmt != SPARSE_FORMAT and fmt not in LEGACY_FORMATS:
        raise CheckpointError(f"{path} is not a sara-edu sparse file (format {fmt!r}); "
                              "full checkpoints load with load_pretrained / load_state_dict")
    saved = _checked_params(meta, tensors, path, legacy=fmt != SPARSE_FORMAT)
    own = dict(model.named_parameters())
    problem = describe_mismatch({n: p.shape for n, p in own.items()}, {n: v["shape"] for n, v in saved.items()})
    if problem:
        raise CheckpointError(f"{path} was trained on a different model: {problem}. Load it into the "
                              "base model it was trained from.")
    updates = {}
    for name, info in saved.items():
        p = own[name]
        if info["trained"]:
            idx, values = _checked_stored(tensors, name, info, p.numel(), path)
            idx = idx.to(p.device)
        else:
            idx, values = torch.zeros(0, dtype=torch.int64, device=p.device), None
        if check_base:
            _check_base(p, idx, name, info, path)
        if values is not None:
            updates[name] = (idx, values)
    for name, (idx, values) in updates.items():
        p = own[name]
        flat_view(p)[idx] = values.to(p.device, p.dtype)
    return model


def _check_base(p: torch.Tensor, idx: torch.Tensor, name: str, info: dict, path) -> None:
    have_dtype = str(p.dtype).removeprefix("torch.")
    if have_dtype != info["dtype"]:
        raise CheckpointError(
            f"{path} was trained on {info['dtype']} weights, but this model holds {have_dtype} ({name}). The "
            "base check compares exact bytes, so load into the base in the dtype it was trained in (e.g. "
            f"load_stable_diffusion(..., unet_dtype=torch.{info['dtype']}) or from_pretrained(..., "
            f"torch_dtype=torch.{info['dtype']})) and convert after loading (model.to(torch.{have_dtype})). Or "
            f"pass check_base=False to write the trained values, cast to {have_dtype}, without the check.")
    if "base_sha256" not in info:  # a sara-edu-sparse/1 file
        have, want = _legacy_fingerprint(p, idx), info["fingerprint"]
        same = have[1] == want[1] and math.isclose(have[0], want[0], rel_tol=1e-9, abs_tol=1e-12)
    else:
        same = _fingerprint(p, idx) == info["base_sha256"]
    if not same:
        raise CheckpointError(
            f"{path} was trained from different base weights: the untouched entries of {name} differ from the "
            "base the file was saved from. Load it into a fresh copy of the same pretrained model (same "
            "checkpoint, same dtype, never converted to another precision and back), or pass check_base=False "
            "if you really mean to transplant the trained entries.")


def _checked_params(meta: dict, tensors: dict, path, legacy: bool) -> dict:
    """The ``params`` metadata, every field checked, so tampering gives CheckpointError, never KeyError."""
    def bad(what):
        return CheckpointError(f"{path} has damaged metadata: {what}. Re-save it with save_sparse, or restore it.")

    params = meta.get("params")
    if not isinstance(params, dict) or not params:
        raise bad("'params' must map every parameter name to its record")
    for name, info in params.items():
        if not isinstance(info, dict):
            raise bad(f"the record of {name!r} is not an object")
        shape, dtype, trained = info.get("shape"), info.get("dtype"), info.get("trained")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise bad(f"{name!r} has shape {shape!r}; expected a list of sizes")
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise bad(f"{name!r} has dtype {dtype!r}")
        numel = math.prod(shape)
        if isinstance(trained, bool) or not isinstance(trained, int) or not 0 <= trained <= numel:
            raise bad(f"{name!r} has trained={trained!r}; expected a count between 0 and {numel}")
        if legacy:
            fp = info.get("fingerprint")
            if not (isinstance(fp, list) and len(fp) == 2 and isinstance(fp[0], (int, float))
                    and isinstance(fp[1], str)):
                raise bad(f"{name!r} has fingerprint {fp!r}")
            continue
        keys = ("base_sha256", "indices_sha256", "values_sha256") if trained else ("base_sha256",)
        for key in keys:
            if not isinstance(info.get(key), str) or not _SHA256.fullmatch(info[key]):
                raise bad(f"{name!r} has {key}={info.get(key)!r}; expected a SHA-256 hex digest")
    expected = {f"{n}::{part}" for n, info in params.items() if info["trained"] for part in ("indices", "values")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise bad(f"it stores {len(extra)} tensors no parameter record mentions (e.g. {extra[0]!r})")
    return params


def _checked_stored(tensors: dict, name: str, info: dict, numel: int, path):
    """The stored ``(indices, values)`` of ``name``, refused if missing, damaged or non-finite."""
    try:
        idx, values = tensors[f"{name}::indices"], tensors[f"{name}::values"]
    except KeyError as e:
        raise CheckpointError(f"{path} is incomplete: no {e.args[0]}") from e
    if "indices_sha256" in info and (_tensor_sha256(idx) != info["indices_sha256"]
                                     or _tensor_sha256(values) != info["values_sha256"]):
        raise CheckpointError(f"{path} is damaged: the stored positions or values of {name} do not match the "
                              "checksums written with them (bit flips or a bad copy). Restore the file or re-save it.")
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or values.dim() != 1 \
            or idx.numel() != values.numel() or idx.numel() != info["trained"] \
            or not values.is_floating_point() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel)):
        raise CheckpointError(f"{path} is corrupt: bad indices/values for {name} (expected {info['trained']} "
                              f"positions below {numel} and as many float values)")
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"{path} is corrupt: {int((~torch.isfinite(values)).sum())} stored values of {name} "
                              "are NaN or infinite. Restore the file or re-save it from a healthy run.")
    return idx, values
