"""Is one LoRA run repeatable? The same 60-step run of the study's rank-matched LoRA, repeated.

    python benchmarks/lora_repeat.py 2     # twice in one process (prints the final loss and a weight checksum)
    python benchmarks/lora_repeat.py 1     # once more, in a fresh process: compare the printed numbers

Behind the README's "The same runs, run again": the study's LoRA rows moved between two executions of the grid;
this checks that a LoRA run by itself is deterministic (on the 2-core CPU all three printed pairs were identical:
loss 0.22653891146183014, checksum -3.650414965430741).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sara_edu.training import train  # noqa: E402
from sara_edu.training.lora import LoRA  # noqa: E402
from sara_edu.world.data import StyleDataset  # noqa: E402
from sara_edu.world.model import load_pretrained  # noqa: E402


def main(repeats: int = 2) -> list[tuple[float, float]]:
    torch.set_num_threads(1)
    pipe, data = load_pretrained(), StyleDataset("hornify", limit_per_digit=8)
    out = []
    for rep in range(repeats):
        run = copy.deepcopy(pipe)
        history = train(run, data, LoRA(rank=25), steps=60, lr=3e-3, batch_size=16, seed=1, progress=False)
        adapter = torch.cat([p.detach().flatten() for n, p in run.unet.named_parameters() if "lora" in n])
        out.append((float(history.loss.iloc[-1]), float(adapter.double().sum())))
        if rep == 0:  # allocate something between the repeats, as another run in the same worker would
            _ = [torch.randn(1000 + k) for k in range(50)]
    print(out)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
