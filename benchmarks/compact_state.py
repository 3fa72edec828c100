"""What SaRA's compact state options change on the course model: weights, loss and the course's metrics.

    python benchmarks/compact_state.py                        # cyberpunk, 200 steps, every option
    python benchmarks/compact_state.py --style ink --steps 100 --n-per-digit 10

Every option of :class:`~sara_edu.sara.SaRAAdamW`'s state (no value copy,
delta/bitmask positions, bf16/8-bit moments, and the compact combinations)
fine-tunes the shipped course model on one style with the same seed, data
order and hyper-parameters as the exact path (SaRA 10%, nuclear norm on,
progressive adjustment at half). Reported per option:

* ``B/entry``: persistent state per trained entry after step 1 (counted from
  the optimizer's tensors, :func:`sara_edu.sara.footprint.state_bytes`);
* ``update vs exact (%)``: ``‖W − W_exact‖ / ‖W_exact − W₀‖`` over the whole
  model after the run, and ``max |ΔW − ΔW_exact| / max |ΔW_exact|``;
* ``final loss`` (mean of the last 10 steps) and the course's metrics
  (:func:`sara_edu.world.metrics.evaluate`: FID analogue, digit/look accuracy,
  prompt agreement) on the style.

The row ``exact, seed 1`` is the exact path with another seed (other batches
and noise): the run-to-run spread a difference should be compared with.

Results: a table on stdout and ``benchmarks/results/compact_state_course.csv``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.sara.footprint import state_bytes  # noqa: E402
from sara_edu.training.loop import train  # noqa: E402
from sara_edu.training.sara import SaRA  # noqa: E402
from sara_edu.world.data import StyleDataset  # noqa: E402
from sara_edu.world.metrics import evaluate  # noqa: E402
from sara_edu.world.model import load_pretrained  # noqa: E402

OPTIONS = {  # key: (label, SaRA keyword arguments)
    "exact": ("exact (default)", {}),
    "nocopy": ("no value copy", {"value_copy": False}),
    "delta": ("delta positions", {"positions": "delta"}),
    "bitmask": ("bitmask positions", {"positions": "bitmask"}),
    "bf16": ("bf16 moments", {"moments": "bf16"}),
    "8bit": ("8-bit moments", {"moments": "8bit"}),
    "compact": ("compact (no copy + delta + bf16)", {"compact": True}),
    "compact8": ("compact 8-bit (no copy + delta + 8-bit)", {"compact": True, "moments": "8bit"}),
}


def flat_weights(pipe) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in pipe.unet.parameters()])


def run(pipe, data, options: dict, *, steps, lr, fraction, batch_size, seed, n_per_digit, style):
    work = copy.deepcopy(pipe)
    counted = {}

    def count(step, pipe, optimizer):
        if step == 1:
            counted.update(state_bytes(optimizer))

    t0 = time.process_time()
    history = train(work, data, SaRA(fraction=fraction, **options), steps=steps, lr=lr, batch_size=batch_size,
                    seed=seed, progress=False, callback=count)
    cpu = time.process_time() - t0
    work.unet.eval()
    metrics = evaluate(work, style, n_per_digit=n_per_digit, seed=0)
    row = {"B/entry": counted["bytes per entry"], "final loss": float(history.loss.tail(10).mean()),
           "train CPU (s)": cpu, **{k: metrics[k] for k in ("fid", "digit_acc", "look_acc", "agreement")}}
    return row, flat_weights(work)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", default="cyberpunk")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-per-digit", type=int, default=20, help="samples per digit for evaluate()")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated keys among: " + ", ".join(OPTIONS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compact_state_course.csv"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pretrained()
    data = StyleDataset(args.style)
    base = flat_weights(pipe)
    unknown = [k for k in args.options.split(",") if k not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; choose among {', '.join(OPTIONS)}")
    runs = {OPTIONS[k][0]: (OPTIONS[k][1], 0) for k in args.options.split(",")}
    runs["exact, seed 1"] = ({}, 1)
    rows, weights = [], {}
    start = time.perf_counter()
    kw = dict(steps=args.steps, lr=args.lr, fraction=args.fraction, batch_size=args.batch_size,
              n_per_digit=args.n_per_digit, style=args.style)
    for label, (opts, seed) in runs.items():
        row, weights[label] = run(pipe, data, opts, seed=seed, **kw)
        rows.append({"option": label, **row})
        print(f"  {label:<40s} {row['B/entry']:6.2f} B/entry  loss {row['final loss']:.4f}  fid {row['fid']:.3f}  "
              f"agreement {row['agreement']:.3f}  ({row['train CPU (s)']:.0f} s CPU)", flush=True)
    exact = weights["exact (default)"] if "exact (default)" in weights else weights["exact, seed 1"]
    update = exact - base
    for row in rows:
        diff = weights[row["option"]] - exact
        row["update vs exact (%)"] = 100 * float(diff.norm() / update.norm())
        row["max |ΔW diff| / max |ΔW| (%)"] = 100 * float(diff.abs().max() / update.abs().max())
    table = pd.DataFrame(rows)
    ref = table.loc[table.option == "exact (default)"]
    if len(ref):
        for col in ("fid", "agreement", "final loss"):
            table[f"{col} - exact"] = table[col] - float(ref[col].iloc[0])
    cols = ["option", "B/entry", "update vs exact (%)", "max |ΔW diff| / max |ΔW| (%)", "final loss", "fid",
            "digit_acc", "look_acc", "agreement"] + [c for c in table if c.endswith(" - exact")] + ["train CPU (s)"]
    table = table[cols]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(f"\n{args.style}, {args.steps} steps, lr {args.lr}, SaRA {args.fraction:.0%}, batch {args.batch_size}, "
              f"evaluate() with {args.n_per_digit} samples per digit\n")
        print(table.to_string(index=False))
    print(f"\nsaved {out}; {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU "
          f"({torch.get_num_threads()} thread(s))")
    return table


if __name__ == "__main__":
    main()
