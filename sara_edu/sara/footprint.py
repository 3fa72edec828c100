"""How many bytes SaRA keeps per trained entry, counted from the tensors it actually holds.

Persistent state is what lives from one step to the next (not the per-layer
transients of a step, not the activations): per considered weight, the
trainable values (or a placeholder of one number without a value copy), the
encoded positions (still training, and frozen by progressive adjustment), the
AdamW moments with their step counter and block scales, and, while the
nuclear-norm term is on, the starting values of 2-D weights. Each part is the
bytes of the distinct storages behind it, so a view or a shared tensor counts
once and nothing is computed from a formula.

After progressive adjustment SaRA also keeps the positions of the entries that
froze (a sparse file stores every entry that trained), but no value, moment or
starting value for them: they are counted apart (``"frozen positions"``), in
the total but not in the bytes per *trained* entry, which therefore still
describes what one entry that trains costs.

With ``cuda_graphs=True`` the selected gradients stay between steps in the
buffers a CUDA graph reads (``"gradient buffers"``, 4 bytes per entry of a
captured weight): counted in the total, apart from the bytes per entry.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .moments import moment_tensors

STATE_PARTS = ("values", "positions", "moments", "initial")


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), t.device)
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def state_bytes(optimizer) -> dict:
    """Bytes of persistent state of a :class:`~sara_edu.sara.SaRAAdamW`, by part, and per trained entry.

    Returns ``{"values", "positions", "moments", "initial"}`` in bytes (the
    state of the entries training now), ``"frozen positions"`` (bytes) and
    ``"frozen entries"`` (entries frozen by progressive adjustment, see the
    module docstring), ``"gradient buffers"`` (``cuda_graphs=True``, see the
    module docstring), ``"total"`` (all of it), ``"trained entries"``
    (training now) and ``"bytes per entry"`` (the four parts per entry
    training now).
    The moments exist from the first step on (torch creates optimizer state
    lazily), so measure after a step.
    """
    if not hasattr(optimizer, "slots") or not hasattr(optimizer, "num_trainable"):
        raise ConfigError(f"state_bytes needs the SaRAAdamW optimizer, which holds SaRA's state, got a "
                          f"{type(optimizer).__name__}: call state_bytes(optimizer) (with the course's loop: "
                          "state_bytes(method.optimizer))")
    seen: set = set()
    parts = dict.fromkeys(STATE_PARTS, 0)
    frozen = buffers = 0
    for slot in optimizer.slots:
        parts["values"] += _storage_bytes([slot.values.detach()], seen)
        parts["positions"] += _storage_bytes(slot.positions.tensors(), seen)
        frozen += _storage_bytes([t for p in slot.frozen for t in p.tensors()], seen)
        state = optimizer.state.get(slot.values, {})
        parts["moments"] += _storage_bytes(moment_tensors(state) + [state.get("step")], seen)
        parts["initial"] += _storage_bytes([slot.initial], seen)
        buffers += _storage_bytes([getattr(slot, "grad_buffer", None)], seen)
    entries = int(optimizer.num_trainable)
    training = sum(parts.values())
    return {**parts, "frozen positions": frozen, "frozen entries": sum(p.count for s in optimizer.slots
                                                                       for p in s.frozen),
            "gradient buffers": buffers, "total": training + frozen + buffers, "trained entries": entries,
            "bytes per entry": training / entries if entries else float("nan")}
