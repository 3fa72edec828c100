"""Where a weight's trained entries are: its sorted flat positions, in three encodings.

SaRA keeps, for every considered weight, the flat (row-major) positions of the
entries that train. How many bytes that costs per trained entry depends on the
encoding (``positions=`` of :class:`~sara_edu.sara.SaRAAdamW`):

* ``"index"`` (default): one int32 per entry (int64 past 2**31 entries): **4 bytes**,
  decoding is free (the tensor *is* the positions).
* ``"bitmask"``: one bit per entry of the *weight*, trained or not: ``numel / 8``
  bytes, i.e. ``1 / (8 · density)`` bytes per trained entry: 1.25 at 10%
  density, but 12.5 at 1%. Decoding scans the whole weight.
* ``"delta"``: the gaps between consecutive positions, one byte each (two if
  that is smaller for this weight), with an escape code for longer gaps: about
  **1 byte** per entry at 10% density (a gap over 255 has probability 0.9**255,
  i.e. never), ~1.08 at 1%. Decoding is a cumulative sum over the codes.

Every encoding decodes to the same sorted int32/int64 positions, bit for bit;
the compact ones decode on use (in the gradient hook and in ``step()``), one
layer at a time, so the decoded positions are transient. ``decode(torch.int64)``
decodes straight to int64, what ``scatter_`` needs and what ``index_select``
is fastest with, with no second pass to convert.

Delta code, for a gap ``g >= 1`` (the first position counts from -1) and the
escape value ``E = 255`` (``65535`` for two-byte codes): ``(g - 1) // E`` codes
``E`` (each adds ``E`` and ends nothing) then one code ``(g - 1) % E`` (adds
that + 1 and ends the entry). Decoding: cumulative sum of the added amounts,
read at the ending codes, minus 1; without escapes simply
``cumsum(codes) + arange(n)``.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .selection import index_dtype_for

POSITION_KINDS = ("index", "bitmask", "delta")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def check_position_kind(kind) -> str:
    if kind not in POSITION_KINDS:
        raise ConfigError(f"positions must be one of {POSITION_KINDS} ('index': 4 bytes per trained entry, exact "
                          f"default; 'delta': ~1 byte; 'bitmask': 1 bit per weight entry), got {kind!r}")
    return kind


def encode_positions(idx: torch.Tensor, numel: int, kind: str = "index"):
    """Encode sorted, distinct flat positions ``idx`` of a weight with ``numel`` entries."""
    check_position_kind(kind)
    if kind == "index":
        return IndexPositions(idx, numel)
    if kind == "bitmask":
        return BitmaskPositions.encode(idx, numel)
    return DeltaPositions.encode(idx, numel)


class IndexPositions:
    """The plain positions (int32 when the weight allows): decoding returns the tensor itself."""

    kind = "index"

    def __init__(self, idx: torch.Tensor, numel: int):
        self.codes, self.numel = idx, int(numel)

    @property
    def count(self) -> int:
        return int(self.codes.numel())

    def decode(self, dtype=None) -> torch.Tensor:
        return self.codes if dtype is None else self.codes.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes]

    def to(self, device):
        return IndexPositions(self.codes.to(device), self.numel)


class BitmaskPositions:
    """One bit per entry of the weight (little-endian within a byte), ``count`` cached."""

    kind = "bitmask"

    def __init__(self, packed: torch.Tensor, numel: int, count: int):
        self.codes, self.numel, self._count = packed, int(numel), int(count)

    @classmethod
    def encode(cls, idx, numel):
        bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.bool, device=idx.device)
        bits[idx.long()] = True
        packed = (bits.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(idx.device)).sum(1, dtype=torch.uint8)
        return cls(packed, numel, idx.numel())

    @property
    def count(self) -> int:
        return self._count

    def decode(self, dtype=None) -> torch.Tensor:
        shifts = torch.arange(8, dtype=torch.uint8, device=self.codes.device)
        bits = (self.codes.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[: self.numel]
        return true_positions(bits, self._count).to(dtype or index_dtype_for(self.numel))

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes]

    def to(self, device):
        return BitmaskPositions(self.codes.to(device), self.numel, self._count)


class DeltaPositions:
    """Gaps between consecutive positions, 1 or 2 bytes each, with escape codes for longer gaps."""

    kind = "delta"

    def __init__(self, codes: torch.Tensor, numel: int, count: int, escapes: int):
        self.codes, self.numel, self._count, self.escapes = codes, int(numel), int(count), int(escapes)

    @property
    def escape(self) -> int:
        return 255 if self.codes.dtype == torch.uint8 else 65535

    @classmethod
    def encode(cls, idx, numel):
        pos = idx.long()
        gaps_minus_1 = torch.diff(pos, prepend=pos.new_full((1,), -1)) - 1
        best = None
        for dtype, escape in ((torch.uint8, 255), (torch.int16, 65535)):
            extra = gaps_minus_1 // escape  # escape codes before each entry's own code
            escapes = int(extra.sum())
            nbytes = (pos.numel() + escapes) * (1 if dtype == torch.uint8 else 2)
            if best is None or nbytes < best[0]:
                best = (nbytes, dtype, escape, extra, escapes)
            if escapes == 0:
                break  # one byte per entry is the least possible
        _, dtype, escape, extra, escapes = best
        ends = torch.cumsum(extra + 1, 0) - 1  # where each entry's own code goes
        values = torch.full((pos.numel() + escapes,), escape, dtype=torch.int32, device=pos.device)
        values[ends] = (gaps_minus_1 % escape).to(torch.int32)
        codes = values.to(torch.uint8) if dtype == torch.uint8 else values.to(torch.int16)  # wraps above 32767
        return cls(codes, numel, pos.numel(), escapes)

    @property
    def count(self) -> int:
        return self._count

    def decode(self, dtype=None) -> torch.Tensor:
        dtype = dtype or index_dtype_for(self.numel)
        if self.escapes == 0 and self.codes.dtype == torch.uint8 and self.codes.device.type != "cpu":
            # on a GPU what costs is launching kernels, not passes: three kernels instead of five
            return torch.cumsum(self.codes, 0, dtype=dtype).add_(
                torch.arange(self.codes.numel(), dtype=dtype, device=self.codes.device))
        if self.escapes == 0:  # position_i = sum of the first i+1 (code + 1), minus 1: summed in place
            if self.codes.dtype == torch.uint8:  # codes <= 254 (255 escapes): code + 1 fits uint8, widened on write
                steps = torch.add(self.codes, 1, out=torch.empty(self.codes.shape, dtype=dtype,
                                                                 device=self.codes.device))
            else:  # two-byte codes are stored as int16 bit patterns
                steps = self.codes.to(dtype).bitwise_and_(0xFFFF).add_(1)
            steps[:1] -= 1
            return steps.cumsum_(0)
        codes = self.codes.to(dtype)
        if self.codes.dtype == torch.int16:
            codes.bitwise_and_(0xFFFF)
        is_end = codes != self.escape
        step = torch.where(is_end, codes + 1, codes)
        return torch.cumsum(step, 0, dtype=codes.dtype).index_select(0, true_positions(is_end, self._count)).sub_(1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes]

    def to(self, device):
        return DeltaPositions(self.codes.to(device), self.numel, self._count, self.escapes)


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Where the 1-D ``mask`` is True (int64), knowing that it is True ``count`` times.

    ``torch.nonzero`` must first ask the GPU how many there are, which waits for
    every kernel queued before it (during the backward pass: the whole pass so
    far); with the count known, ``nonzero_static`` does not wait.
    """
    if mask.device.type != "cpu":
        try:
            return torch.nonzero_static(mask, size=count).view(-1)
        except (NotImplementedError, RuntimeError):  # a device or torch without it: the waiting way
            pass
    return torch.nonzero(mask).view(-1)


def entry_bounds(sorted_positions: torch.Tensor, edges: list[int]) -> list[int]:
    """Where each flat position of ``edges`` (ascending) falls among a weight's sorted trained positions: two
    consecutive bounds are the range of entries between two edges. One search for all (one device wait)."""
    edges = torch.tensor(edges, dtype=sorted_positions.dtype, device=sorted_positions.device)
    return torch.searchsorted(sorted_positions, edges).tolist()


def positions_nbytes(positions) -> int:
    """Bytes of the tensors behind one encoding (what it costs to keep)."""
    return sum(t.untyped_storage().nbytes() for t in positions.tensors())
