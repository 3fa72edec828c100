"""Which samples each optimizer step sees: the same global batch on every process.

Every process draws the *global* batch (and, in the loop, its noise and
timesteps) from one seeded generator, then keeps its own share. So a run on
two processes sees exactly the samples, noise and timesteps of a run on one
process with the same global batch size: the two can be compared number for
number, and resuming restores the generator and the position in the epoch.
"""
from __future__ import annotations

import torch


class GlobalBatches:
    """Endless shuffled batches of dataset indices, epoch after epoch.

    The last batch of an epoch is shorter when the dataset size is not a
    multiple of ``batch_size`` (as a plain ``DataLoader`` would give it),
    unless it has fewer than ``min_size`` samples (one per process and
    micro-batch): then those few are left out of that epoch.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, min_size: int = 1):
        self.n, self.batch_size, self.generator, self.min_size = n, batch_size, generator, min_size
        self._chunks: list[list[int]] = []

    def next(self) -> list[int]:
        if not self._chunks:
            chunks = [c.tolist() for c in torch.randperm(self.n, generator=self.generator).split(self.batch_size)]
            self._chunks = [c for c in chunks if len(c) >= self.min_size]
        return self._chunks.pop(0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "chunks": self._chunks}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._chunks = [list(map(int, c)) for c in state["chunks"]]


def shares(indices: list[int], micro_steps: int, world_size: int, rank: int) -> list[list[int]]:
    """Positions (into the global batch) that ``rank`` processes in each micro-step.

    Micro-step ``j`` takes every ``micro_steps``-th sample starting at ``j``;
    its samples are dealt out to the processes the same way.
    """
    positions = list(range(len(indices)))
    return [positions[j::micro_steps][rank::world_size] for j in range(micro_steps)]
