"""Does it matter that SaRA keeps the AdamW moments at progressive adjustment? The authors' release resets them.

    python benchmarks/reset_moments.py            # 300 steps, 3 seeds (about 7 CPU-min on a 2-core CPU)

SaRA on the whole course UNet (fraction 0.1, lr 1e-3, batch 16, progressive adjustment at half, λ 5e-4, the
cyberpunk style), once with ``reset_moments=False`` (the course's default: the continuing entries keep their
moments) and once with ``True`` (zero moments and step count for them, as the authors' code does). Per seed: the
final training loss (mean of the last 10 steps) of each, and how far apart the two fine-tuned UNets end, as a
share of how far each moved from the pretrained one (‖W_keep − W_reset‖ / ‖W_keep − W_0‖ over the trained
weights). Table: mean over seeds ± half a 95% t-interval. Writes ``benchmarks/results/reset_moments.csv``.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.io import atomic_write_bytes  # noqa: E402
from sara_edu.study.stats import t_quantile  # noqa: E402
from sara_edu.training import SaRA, train  # noqa: E402
from sara_edu.world.data import StyleDataset  # noqa: E402
from sara_edu.world.model import load_pretrained  # noqa: E402


def distance(a, b) -> float:
    return math.sqrt(sum(float((p.detach() - q.detach()).double().pow(2).sum())
                         for p, q in zip(a.parameters(), b.parameters())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reset_moments.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe, data = load_pretrained(), StyleDataset("cyberpunk", limit_per_digit=8)
    rows = []
    for seed in args.seeds:
        tuned, start = {}, time.process_time()
        for reset in (False, True):
            run = copy.deepcopy(pipe)
            history = train(run, data, method=SaRA(fraction=0.1, seed=seed, reset_moments=reset), steps=args.steps,
                            lr=1e-3, batch_size=16, seed=seed, progress=False)
            tuned[reset] = (run, float(history.loss.tail(10).mean()))
        (keep, loss_keep), (reset, loss_reset) = tuned[False], tuned[True]
        rows.append({"seed": seed, "steps": args.steps, "loss_keep": loss_keep, "loss_reset": loss_reset,
                     "apart_over_moved": distance(keep.unet, reset.unet) / distance(keep.unet, pipe.unet),
                     "cpu_s": time.process_time() - start})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    atomic_write_bytes(Path(args.out), lambda tmp: df.to_csv(tmp, index=False))
    n = len(df)
    for col in ("loss_keep", "loss_reset", "apart_over_moved"):
        h = t_quantile(n) * df[col].std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
        print(f"{col}: {df[col].mean():.4g} ± {h:.2g}")
    d = df.loss_reset - df.loss_keep
    print(f"loss reset − keep: {d.mean():+.4f} ± {t_quantile(n) * d.std(ddof=1) / math.sqrt(n):.4f} "
          f"({n} seeds, {df.cpu_s.sum() / 60:.1f} CPU-min); wrote {args.out}")


if __name__ == "__main__":
    main()
