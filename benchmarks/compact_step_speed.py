"""How long SaRAAdamW's optimizer step takes per trained entry: exact vs compact state.

    python benchmarks/compact_step_speed.py                  # one thread, 1280-channel layers (~66M weights)
    python benchmarks/compact_step_speed.py --channels 640 --threads 2

Synthetic layers with the shapes of one 1280-channel level of Stable Diffusion
1.5's UNet (a ResNet block and a transformer block: 3x3 convs of 14.7M
entries, attention and feed-forward projections, and the small biases and
norms in between), random N(0, 0.02) weights, SaRA 10% (global fraction), no
nuclear norm. Each trained entry gets a fixed random gradient; ``step()`` is
timed (no forward/backward), median of ``--repeats`` after two warm-up steps,
and divided by the number of trained entries.

Rows: the exact path (stock fused AdamW on value copies, then scatter), and
the compact options, whose step decodes positions, gathers the values from the
weights, runs AdamW, encodes the moments and scatters back, one layer at a time;
each also with ``compiled=True`` (one torch.compile'd kernel per weight: gather,
AdamW, write-back). The options take turns step by step (interleaved), process
CPU time, the compilation falls in the warm-up steps; the medians go to
``benchmarks/results/compact_step_speed_cpu.csv`` with the ratio to the exact
path. Nothing is asserted: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.sara.optimizer import SaRAAdamW  # noqa: E402

OPTIONS = {
    "exact (default)": {},
    "exact compiled": {"compiled": True},
    "no value copy (fp32 moments)": {"value_copy": False},
    "no value copy compiled": {"value_copy": False, "compiled": True},
    "compact (bf16)": {"compact": True},
    "compact (bf16) compiled": {"compact": True, "compiled": True},
    "compact 8-bit": {"compact": True, "moments": "8bit"},
}


def layer_shapes(c: int) -> list[tuple[int, ...]]:
    """One ResNet block and one transformer block at ``c`` channels (SD 1.5: c = 320, 640, 1280)."""
    resnet = [(c, c, 3, 3), (c,), (c, c, 3, 3), (c,), (c, 1280), (c,)] + [(c,)] * 4  # convs, time proj, norms
    attn = [(c, c)] * 3 + [(c, c), (c,)]  # self-attention q, k, v, out
    cross = [(c, c), (c, 768), (c, 768), (c, c), (c,)]  # cross-attention: k, v from the 768-d text
    ff = [(8 * c, c), (8 * c,), (c, 4 * c), (c,)]  # GEGLU projection and output
    transformer = [(c,), (c,), (c, c), (c,)] + attn + cross + ff + [(c,)] * 6 + [(c, c), (c,)]
    return resnet + transformer


class Layers(nn.Module):
    def __init__(self, shapes, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes)


def make_optimizer(options: dict, shapes) -> SaRAAdamW:
    model = Layers(shapes)
    opt = SaRAAdamW(model, lr=1e-4, fraction=0.1, rank_lambda=0, weight_decay=1e-2, **options)
    g = torch.Generator().manual_seed(1)
    for slot in opt.slots:  # as after backward(): each optimizer param has its selected gradient
        slot.values.grad = torch.randn(slot.count, generator=g) * 1e-3
    opt.model_ref = model  # keep the weights alive
    return opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma-separated row names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compact_step_speed_cpu.csv"))
    args = ap.parse_args(argv)
    import pandas as pd

    torch.set_num_threads(args.threads)
    shapes = layer_shapes(args.channels)
    numel = sum(torch.Size(s).numel() for s in shapes)
    names = args.options.split(",")
    print(f"{len(shapes)} layers, {numel / 1e6:.1f}M weights, SaRA 10%, torch {torch.__version__}, "
          f"{args.threads} thread(s); {len(names)} options interleaved, 2 warm-up + {args.repeats} timed steps")
    opts = {name: make_optimizer(OPTIONS[name], shapes) for name in names}
    times = {name: [] for name in names}
    for i in range(args.repeats + 2):
        for name in names[i % len(names):] + names[:i % len(names)]:  # a different order every round
            t0 = time.process_time()
            opts[name].step()
            if i >= 2:
                times[name].append(time.process_time() - t0)
    n = opts[names[0]].num_trainable
    rows = [{"option": name, "ms/step": 1e3 * statistics.median(times[name]),
             "ns/entry": 1e9 * statistics.median(times[name]) / n} for name in names]
    table = pd.DataFrame(rows)
    if "exact (default)" in names:
        table["x exact"] = table["ms/step"] / float(table.loc[table.option == "exact (default)", "ms/step"].iloc[0])
    from sara_edu.sara.fused_step import COMPILE_STATS

    print(table.to_string(index=False, float_format="{:.2f}".format))
    print(f"compilations: {COMPILE_STATS['compilations']} ({COMPILE_STATS['seconds']:.1f} s wall)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.4g")
    print(f"saved {args.out}")
    return table


if __name__ == "__main__":
    main()
