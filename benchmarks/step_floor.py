"""The least time SaRA can add to a plain step: read the trained entries out of every dense weight gradient
and write them back into every weight, whatever the optimizer does in between.

    python benchmarks/step_floor.py            # SD-1.5-sized UNet, 10% (about 1 min on a CPU)

At 10% density the trained entries sit in nearly every cache line of a weight, so the gather reads
the whole gradient and the write-back reads and writes the whole weight. Both are timed alone here with
the course's fair timing (``compare_step_times``: interleaved, process CPU time on a CPU, synchronised
wall time on CUDA, median of 3 after a warm-up). The floor is
compared with the plain forward+backward step of ``results/memory_time_<device>_sd15.csv``: the result is
the smallest ``x plain`` ratio any implementation of SaRA could reach there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_time import _theta_10, sd15_unet  # noqa: E402

from sara_edu.measure.timing import compare_step_times  # noqa: E402
from sara_edu.training.loop import pick_device  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--reference", default=None,
                        help="memory_time CSV with the plain step (default results/memory_time_<device>_sd15.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    unet = sd15_unet().to(device)
    theta = _theta_10(unet)
    weights = [p.detach() for p in unet.parameters()]
    positions = [torch.nonzero(w.reshape(-1).abs() < theta).view(-1) for w in weights]
    grads = [torch.randn_like(w) for w in weights]  # stand-ins for the dense gradients backward produces

    def gather():
        return [g.reshape(-1).index_select(0, i) for g, i in zip(grads, positions)]

    values = gather()

    def write_back():
        for w, i, v in zip(weights, positions, values):
            w.reshape(-1).scatter_(0, i, v)

    table = compare_step_times({"gather the trained entries of every weight gradient": gather,
                                "write them back into every weight": write_back}, repeats=3, warmup=1)
    table = table.rename_axis("what").reset_index()[["what", "seconds"]]
    floor = float(table.seconds.sum())
    reference = Path(args.reference) if args.reference else (
        ROOT / "benchmarks" / "results" / f"memory_time_{device.type}_sd15.csv")
    print(f"SD1.5-sized UNet, {sum(p.numel() for p in positions):,} trained entries (10%), "
          f"{'CUDA wall' if cuda else 'process CPU'} time, {torch.get_num_threads()} thread(s)")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"floor: {floor:.3f} s per step")
    if reference.exists():
        ref = pd.read_csv(reference).set_index("key")
        column = "median step wall (s)" if cuda else "median step CPU (s)"
        plain = float(ref.loc["plain", column])
        print(f"plain forward+backward ({reference.name}): {plain:.3f} s -> no SaRA step can be faster than "
              f"{(plain + floor) / plain:.3f}x plain here")
    return table


if __name__ == "__main__":
    main()
