"""AdamW's two moments per trained entry, kept in fp32, bf16 or 8 bits.

The moments (``exp_avg`` m, ``exp_avg_sq`` v) are 8 of the 16 bytes SaRA keeps
per trained entry. ``moments=`` of :class:`~sara_edu.sara.SaRAAdamW` picks how
they are stored between steps; every step decodes one layer's moments to fp32,
runs the AdamW update in fp32 and encodes them again:

* ``"fp32"``: 8 bytes per entry, exact (what ``torch.optim.AdamW`` keeps).
* ``"bf16"``: 4 bytes. bfloat16 keeps 8 significant bits. Rounding to nearest
  would freeze v: ``v ← 0.999·v + 0.001·g²`` changes v by 0.1%, less than half
  a bf16 step (0.2-0.4%), so a v whose gradient shrank would round back to
  itself for ever. We round **stochastically** instead (add 16 random bits
  below the kept ones, then truncate): each stored value is the fp32 value in
  expectation, so v decays as it should, with ~0.4% noise per step.
* ``"8bit"``: ~2.03 bytes, blockwise like 8-bit Adam (Dettmers et al., 2022):
  each block of 256 consecutive entries keeps one fp32 scale (its largest
  ``|value|``) and every entry a float8 (e4m3: 3 significant bits, ~5 decades)
  of its value relative to that scale. Quantising *relative to the block's
  largest value* is what makes 8 bits enough: large and small moments in
  different blocks keep their own scale. Rounding is stochastic as for bf16;
  v never rounds to 0 (a non-zero m over a zero v is m/eps: a huge step); it
  is kept at least at the smallest float8 (2**-9 / 448 of the block's scale).
  Encoding uses torch's native float8 cast rather than a 256-entry code book
  (a nearest-code search, ``bucketize``, costs ~20x more per entry on a CPU);
  decoding on a CPU looks the codes up in the 256 values that cast gives
  (torch's float8 -> fp32 cast is slow there), on CUDA it is the cast.

Encoding writes into the stored tensors directly (``copy_`` converts: one pass,
no new tensor) and takes bf16's stochastic rounding as the top half of the
fp32 bit pattern (a view); both are bit for bit the plain casts.

Measured effect (``benchmarks/compact_state.py``: course model, cyberpunk
style, 200 steps, lr 1e-3, SaRA 10%, same seed and batches as the exact path):
after the run the weights' update differs from the exact path's by 1.1% (bf16)
and 7.6% (8 bits) in norm; the FID analogue is 146.9 and 147.4 against 147.0,
prompt agreement 0.870 for all three, the final loss equal to 4 digits. The
exact path with another seed differs by 69% (FID 115.0): the rounding is far
below run-to-run variation.

The stochastic rounding draws from a ``torch.Generator`` owned by the
optimizer (seeded by its ``seed``, saved in its ``state_dict``), so runs and
resumed runs are reproducible.

State layout in ``optimizer.state[param]`` (what ``state_dict`` saves):
``exp_avg``/``exp_avg_sq`` (float32, bfloat16 or float8_e4m3fn) and, for 8 bits,
``exp_avg_scale``/``exp_avg_sq_scale`` (float32, one per block of 256).
"""
from __future__ import annotations

import sys

import torch

from ..errors import ConfigError

MOMENT_KINDS = ("fp32", "bf16", "8bit")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
BLOCK = 256
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # the largest float8_e4m3fn
_FP8_TINY = 2.0**-9  # its smallest positive (subnormal) value
_DROPPED_BITS = {torch.bfloat16: 16, _FP8: 20}  # fp32 mantissa bits below the kept ones
_TABLE = 1 << 16  # random numbers drawn per stochastic rounding (see _plus_random_bits)
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which bf16 of an fp32 viewed as two holds its top 16 bits
_FP8_VALUES = {}  # device -> the 256 float8_e4m3fn values as float32, indexed by their bit pattern


def check_moment_kind(kind) -> str:
    if kind not in MOMENT_KINDS:
        raise ConfigError(f"moments must be one of {MOMENT_KINDS} ('fp32': 8 bytes per trained entry, exact "
                          f"default; 'bf16': 4 bytes; '8bit': ~2 bytes, blockwise), got {kind!r}")
    return kind


def moment_kind(state: dict) -> str | None:
    """The format a param's state is in (None before its first step)."""
    m = state.get("exp_avg")
    if m is None:
        return None
    if "exp_avg_scale" in state:
        return "8bit"
    return "bf16" if m.dtype == torch.bfloat16 else "fp32"


# ----------------------------------------------------------------- one step: decode, update, encode


def init_moments(state: dict, n: int, kind: str, device) -> None:
    """Zero moments for ``n`` entries, in ``kind``."""
    store_moments(state, kind, torch.zeros(n, device=device), torch.zeros(n, device=device), None)


def load_moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) as fp32. For fp32 state these are the stored tensors themselves (update in place)."""
    kind = moment_kind(state)
    if kind == "fp32":
        return state["exp_avg"], state["exp_avg_sq"]
    if kind == "bf16":
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    return (_dequantize(state["exp_avg"], state["exp_avg_scale"]),
            _dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale"]))


def store_moments(state: dict, kind: str, m: torch.Tensor, v: torch.Tensor, generator) -> None:
    """Encode fp32 ``m``, ``v`` into ``state`` as ``kind``; ``generator=None`` rounds to nearest.

    Tensors of the right format and size are overwritten in place: the long-lived
    moments keep their memory from step to step, and only a layer's transients
    come and go (replacing them each step fragments the heap and raises the
    process's resident memory).
    """
    if kind == "8bit":
        for key, x, gen, floor in (("exp_avg", m, None, False), ("exp_avg_sq", v, generator, True)):
            normed, scales = _quantize(x, gen, floor)
            _put(state, key, normed, _FP8)
            _put(state, f"{key}_scale", scales, torch.float32)
        return
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    _put(state, "exp_avg", m.float(), dtype)  # nothing to do when m is the stored fp32 tensor, updated in place
    _put(state, "exp_avg_sq", v.float() if kind == "fp32" else _round(v, dtype, generator), dtype)
    for key in ("exp_avg_scale", "exp_avg_sq_scale"):
        state.pop(key, None)


def _put(state: dict, key: str, value: torch.Tensor, dtype) -> None:
    """Store ``value`` as ``dtype``: converted into the stored tensor when it fits (one pass, no new tensor)."""
    old = state.get(key)
    if old is value:
        return
    if old is not None and old.dtype == dtype and old.shape == value.shape and old.device == value.device:
        old.copy_(value)  # copy_ converts as .to(dtype) does (round to nearest), bit for bit
    else:
        state[key] = value.to(dtype, copy=value._is_view())  # a view (of _round's pattern) must not be kept


def _round(x: torch.Tensor, dtype, generator) -> torch.Tensor:
    """fp32 ``x`` rounded to the values of ``dtype`` (bf16/float8), stochastically (unbiased) when a generator
    is given; still fp32 (or, for bf16, already bf16), for ``_put`` to convert exactly."""
    x = x.float()
    if generator is None:
        return x
    bits = _DROPPED_BITS[dtype]
    # Adding random bits below the kept ones and truncating rounds the magnitude up with probability
    # equal to the dropped fraction (sign-magnitude format: it works the same for negatives).
    pattern = _plus_random_bits(x.view(torch.int32), bits, generator)
    if dtype == torch.bfloat16:  # truncating to bf16 = keeping the top 16 bits: a view, no pass
        return pattern.view(torch.bfloat16)[_HIGH_HALF::2]
    return pattern.bitwise_and_(-(1 << bits)).view(torch.float32)


def _plus_random_bits(pattern: torch.Tensor, bits: int, generator) -> torch.Tensor:
    """``pattern + U[0, 2**bits)`` per entry, drawing one fresh table of 65,536 numbers per call.

    Entry ``i`` takes the table's entry ``i mod 65,536``: across steps every entry gets an
    independent uniform draw (what unbiased rounding needs), at a quarter of the cost of
    drawing a number per entry (~1 instead of ~4.5 ns per entry on a CPU).
    """
    n = pattern.numel()
    table = torch.randint(0, 1 << bits, (min(n, _TABLE),), dtype=torch.int32, device=pattern.device,
                          generator=generator)
    if n <= _TABLE:
        return pattern + table
    out = torch.empty_like(pattern)
    full = n - n % _TABLE
    torch.add(pattern[:full].view(-1, _TABLE), table, out=out[:full].view(-1, _TABLE))
    torch.add(pattern[full:], table[: n - full], out=out[full:])
    return out


def _blocks(x: torch.Tensor):
    """(full blocks as an (nb, 256) view, the shorter tail) of a 1-D tensor."""
    nb = x.numel() // BLOCK
    return x[: nb * BLOCK].view(nb, BLOCK), x[nb * BLOCK:]


def _block_scales(x: torch.Tensor) -> torch.Tensor:
    full, tail = _blocks(x)
    scales = full.abs().amax(1)
    if tail.numel():
        scales = torch.cat([scales, tail.abs().amax().view(1)])
    return scales


def _per_block(x: torch.Tensor, factors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x`` times its block's factor, written to ``out`` (which may be ``x``)."""
    o_full, o_tail = _blocks(out)
    x_full, x_tail = _blocks(x)
    nb = o_full.shape[0]
    torch.mul(x_full, factors[:nb, None], out=o_full)
    if o_tail.numel():
        torch.mul(x_tail, factors[nb], out=o_tail)
    return out


def _quantize(x: torch.Tensor, generator, floor: bool):
    """fp32 -> (values relative to each block's largest |x|, rounded to float8 values but still fp32 for
    ``_put`` to convert, fp32 scale per block)."""
    scales = _block_scales(x)
    # An all-zero block keeps scale 0 and codes 0; dividing by 1 there avoids 0/0.
    normed = _per_block(x, _FP8_MAX / torch.where(scales > 0, scales, torch.ones_like(scales)),
                        torch.empty(x.shape, dtype=torch.float32, device=x.device))
    if floor:  # v >= 0: a non-zero value must not become 0 (see module docstring); 0 may become tiny
        normed.clamp_(min=_FP8_TINY)
    else:  # |x| <= scale, so |normed| <= 448 but for the last bit of rounding
        normed.clamp_(-_FP8_MAX, _FP8_MAX)
    return _round(normed, _FP8, generator), scales


def _dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes -> fp32 values. On a CPU torch's float8 -> fp32 cast is slow (~6 ns per entry): look the
    codes' bit patterns up in a table of the 256 values that cast gives instead (~0.6 ns, same bits)."""
    if codes.device.type == "cpu":
        table = _FP8_VALUES.get(codes.device)
        if table is None:
            table = _FP8_VALUES[codes.device] = torch.arange(256, dtype=torch.uint8).view(_FP8).float()
        values = table.index_select(0, codes.view(torch.uint8).int())
    else:
        values = codes.float()
    return _per_block(values, scales / _FP8_MAX, values)


# ----------------------------------------------------------------- several params at once


def group_layout(counts, kind: str) -> list[int]:
    """Each param's room in a buffer shared by several: its count, rounded up to whole blocks for 8 bits
    (so that every param's blocks start where its own would: blockwise work on the buffer is per param)."""
    pad = BLOCK if kind == "8bit" else 1
    return [-(-n // pad) * pad for n in counts]


def group_views(buf: torch.Tensor, counts, sizes) -> list[torch.Tensor]:
    """Each param's entries in a shared buffer laid out by :func:`group_layout` (one split, no copy)."""
    if list(sizes) == list(counts):
        return list(buf.split(list(counts)))
    pieces = [k for n, size in zip(counts, sizes) for k in (n, size - n)]
    return list(buf.split(pieces))[0::2]


def load_moments_group(states, counts, device) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(m, v, m views, v views): several params' moments decoded to fp32 in one buffer each.

    The same numbers as :func:`load_moments` per param, in a few kernels for the
    whole group instead of a few per param (what costs on a GPU is launching them).
    """
    kind = moment_kind(states[0])
    sizes = group_layout(counts, kind)
    out = []
    for key in MOMENT_KEYS:
        if kind == "8bit":  # the padding's codes are 0: value 0, no effect on a block's largest |value|
            codes = torch.zeros(sum(sizes), dtype=_FP8, device=device)
            torch._foreach_copy_(group_views(codes, counts, sizes), [st[key] for st in states])
            buf = _dequantize(codes, torch.cat([st[f"{key}_scale"] for st in states]))
        else:
            buf = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            torch._foreach_copy_(group_views(buf, counts, sizes), [st[key] for st in states])
        out.append(buf)
    m, v = out
    return m, v, group_views(m, counts, sizes), group_views(v, counts, sizes)


def store_moments_group(states, kind: str, m: torch.Tensor, v: torch.Tensor, counts, generator) -> None:
    """Encode the group buffers of :func:`load_moments_group` back into each param's state (bf16 or 8 bits).

    Per param the same format as :func:`store_moments`; the stochastic rounding
    draws its random bits for the whole buffer, so they differ from a per-param
    encoding's (as unbiased, and as reproducible from the optimizer's generator).
    """
    sizes = group_layout(counts, kind)
    if kind == "8bit":
        for key, x, gen, floor in (("exp_avg", m, None, False), ("exp_avg_sq", v, generator, True)):
            normed, scales = _quantize(x, gen, floor)  # per block, so per param (blocks aligned)
            torch._foreach_copy_([st[key] for st in states], group_views(normed, counts, sizes))
            torch._foreach_copy_([st[f"{key}_scale"] for st in states],
                                 list(scales.split([size // BLOCK for size in sizes])))
        return
    torch._foreach_copy_([st["exp_avg"] for st in states], group_views(m, counts, sizes))
    torch._foreach_copy_([st["exp_avg_sq"] for st in states],
                         group_views(_round(v, torch.bfloat16, generator), counts, sizes))


# ----------------------------------------------------------------- changing the entries or the format


def keep_entries(state: dict, keep: torch.Tensor) -> None:
    """Keep only the entries where ``keep`` is True (progressive adjustment), in the same format.

    8-bit moments are decoded, filtered and encoded again (rounding to nearest):
    the blocks are regrouped, so every continuing entry is quantised once more.
    """
    kind = moment_kind(state)
    if kind is None:
        return
    if kind in ("fp32", "bf16"):
        for key in MOMENT_KEYS + ("max_exp_avg_sq",):
            if key in state:
                state[key] = state[key][keep]
        return
    m, v = load_moments(state)
    store_moments(state, kind, m[keep], v[keep], None)


def convert_moments(state: dict, kind: str) -> None:
    """Put a param's moments into ``kind`` (resuming from a checkpoint saved with other options)."""
    have = moment_kind(state)
    if have is None or have == kind:
        return
    m, v = load_moments(state)
    store_moments(state, kind, m, v, None)


def moment_tensors(state: dict) -> list[torch.Tensor]:
    """The tensors a param's moments occupy (for byte accounting)."""
    keys = MOMENT_KEYS + ("exp_avg_scale", "exp_avg_sq_scale", "max_exp_avg_sq")
    return [state[k] for k in keys if isinstance(state.get(k), torch.Tensor)]
