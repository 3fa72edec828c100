"""The numbers behind two of the paper's claims that the study's training runs do not test.

    python benchmarks/paper_claims.py            # about 2 minutes on a 2-core CPU

1. *The smallest 10-20% of the weights can be zeroed with little change*: the
   shipped model's FID analogue and prompt agreement with 0%, 10%, 15% and 20%
   of its smallest-|w| weights zeroed (notebook 02's curve, at the study's
   evaluation size).
2. *Small weights are temporarily ineffective*: of the smallest 10% at each
   pretraining checkpoint, the share still in the smallest 10% of the final
   weights (chance = 10%), and the share that ended above the median
   (notebook 01's stability figure).

Writes ``reports/claims_inputs.csv`` (claim, measure, value), which
``python -m sara_edu.study report`` folds into the claims table.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.lessons.pruning_thresholds import quality_vs_pruning  # noqa: E402
from sara_edu.lessons.weight_distributions import (  # noqa: E402
    final_percentiles,
    pretraining_snapshots,
    smallest_set_stability,
)
from sara_edu.world.model import load_pretrained  # noqa: E402

OUT = ROOT / "reports" / "claims_inputs.csv"


def measure() -> pd.DataFrame:
    rows = []
    pipe = load_pretrained()
    pruning = quality_vs_pruning(pipe, fractions=(0.0, 0.1, 0.15, 0.2), n_per_digit=6, steps=20, progress=False)
    for r in pruning.itertuples():
        pct = round(100 * r.fraction)
        rows += [("zeroing", f"fid_at_{pct}", r.fid), ("zeroing", f"agreement_at_{pct}", r.agreement)]
    snapshots = pretraining_snapshots()
    stability = smallest_set_stability(snapshots, fraction=0.1)
    first = stability.iloc[0]
    rows += [("temporarily_ineffective", "first_checkpoint_step", float(first.step)),
             ("temporarily_ineffective", "total_steps", float(snapshots[-1].step)),
             ("temporarily_ineffective", "retained_from_first", float(first.retained)),
             ("temporarily_ineffective", "chance", float(first.chance))]
    percentiles = final_percentiles(snapshots[0], snapshots[-1], fraction=0.1)
    rows += [("temporarily_ineffective", "share_above_median", float((percentiles > 50).float().mean())),
             ("temporarily_ineffective", "share_below_30th", float((percentiles < 30).float().mean()))]
    return pd.DataFrame(rows, columns=["claim", "measure", "value"])


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    table = measure()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT, index=False, float_format="%.6g")
    print(table.to_string(index=False))
    print(f"wrote {OUT.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
