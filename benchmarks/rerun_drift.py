"""How far do the same study runs land when they are run again? Two results CSVs compared run by run.

    python benchmarks/rerun_drift.py OLD.csv NEW.csv
    git show 548d18e:reports/study_results.csv > /tmp/old.csv && python benchmarks/rerun_drift.py /tmp/old.csv reports/study_results.csv

Rows with the same ``run_id`` (same method, style, seed, rate, steps and protocol) that both CSVs ran (rows
copied with ``--reuse`` are skipped): per method, how many runs moved at all, and the largest change of the final
training loss, the FID analogue and the prompt agreement. Same code, same seeds, one torch thread: any change is
numerical, from bit-level differences between processes that training may amplify.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.study.config import read_results  # noqa: E402


def drift(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    ran = new[~new.phase.astype(str).str.contains("reused")].set_index("run_id")
    old = old.set_index("run_id")
    both = ran.index.intersection(old.index)
    diff = pd.DataFrame({"method": ran.loc[both, "method"]})
    for col in ("final_loss", "fid", "agreement"):
        diff[col] = (ran.loc[both, col] - old.loc[both, col]).abs()
    diff["moved"] = diff[["final_loss", "fid", "agreement"]].fillna(0).gt(0).any(axis=1)
    return diff.groupby("method").agg(runs=("moved", "size"), moved=("moved", "sum"),
                                      max_loss_change=("final_loss", "max"), max_fid_change=("fid", "max"),
                                      max_agreement_change=("agreement", "max"))


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python benchmarks/rerun_drift.py OLD.csv NEW.csv")
    print(drift(read_results(args[0]), read_results(args[1])).to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
