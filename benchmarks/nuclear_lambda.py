"""When does the nuclear-norm term make SaRA's update low-rank? A λ sweep on the course model.

    python benchmarks/nuclear_lambda.py                       # 300 steps, 3 seeds, the λ grid below
    python benchmarks/nuclear_lambda.py --steps 30 --seeds 0  # a quick look
    python benchmarks/nuclear_lambda.py --via direct          # the term as its own step, not through AdamW

Two settings, each SaRA (fraction 0.1, lr 1e-3, batch 16, progressive adjustment
at half, the course's cyberpunk style), changing only λ and the term's options:

* ``focus``: notebook 03's section 5. Only the 4 feed-forward matrices of one up
  block train, so the one-matrix-per-step term reaches each of them every 4th
  step: what the penalty can do when it meets a matrix often.
* ``whole``: the whole UNet, as SaRA is used. With ``nuclear_targets="2d"`` the
  term picks one of the 83 matrices per step and never a convolution (which
  holds most trained entries); ``"conv"`` adds the convolutions, reshaped.

Per run and trained matrix or convolution (``penalised``: the term could pick it): ``rank_90`` (singular values holding 90% of the
update's energy, ``Σσ²``), ``nuc/fro`` (‖ΔW‖*/‖ΔW‖_F: 1 for rank one, up to
sqrt(rank) for a flat spectrum) as a share of its flat-spectrum value, and the
final training loss. The table gives the mean over seeds ± half a 95%
t-interval of each setting's per-run mean over its weights.

``--via direct`` asks whether it matters that the term goes through AdamW (the authors'
release adds λ·U·Vᵀ to the gradient, so AdamW rescales it with the loss gradient):
``SaRA(nuclear_via="direct")`` subtracts lr·λ·U·Vᵀ after AdamW's step instead. It runs
the focus setting at λ = 5e-4 and 5e-3 and writes ``nuclear_via.csv``; the table then
sets it beside the AdamW runs of ``nuclear_lambda.csv`` (same seeds, steps and λ).

Results: a table on stdout and ``benchmarks/results/nuclear_lambda.csv`` (one row
per run and weight).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.lessons.sara_step_by_step import rank_for_energy, update_spectrum  # noqa: E402
from sara_edu.sara.optimizer import nuclear_matrix_shape  # noqa: E402
from sara_edu.study.stats import t_quantile  # noqa: E402
from sara_edu.training import SaRA, train  # noqa: E402
from sara_edu.world.data import StyleDataset  # noqa: E402
from sara_edu.world.model import load_pretrained  # noqa: E402

FOCUS = r"up_blocks\.1\.attentions\.\d\.transformer_blocks\.0\.ff"  # notebook 03's 4 feed-forward matrices
LAMBDAS = (0.0, 5e-4, 2e-3, 5e-3, 2e-2, 5e-2, 5e-1)
#: (setting, nuclear_targets, λ values): the focus sweep, and the whole UNet at the authors' λ and a 10x one.
SETTINGS = (("focus", "2d", LAMBDAS), ("whole", "2d", (0.0, 5e-4, 5e-3)), ("whole", "conv", (5e-4, 5e-3)))
#: ``--via direct``: the focus setting at the authors' λ and a 10x one.
DIRECT_SETTINGS = (("focus", "2d", (5e-4, 5e-3)),)


def run_one(pipe, data, setting, targets, lam, seed, steps, lr, via="adam"):
    tuned = copy.deepcopy(pipe)
    method = SaRA(fraction=0.1, rank_lambda=lam, seed=seed, nuclear_targets=targets, nuclear_via=via,
                  target_modules=FOCUS if setting == "focus" else None)
    start = time.process_time()
    history = train(tuned, data, method=method, steps=steps, lr=lr, batch_size=16, seed=seed, progress=False)
    cpu = time.process_time() - start
    loss = float(history.loss.tail(10).mean())
    rows = []
    for name, p in pipe.unet.named_parameters():
        if nuclear_matrix_shape(p.shape, "conv") is None:  # every matrix and convolution, penalised or not
            continue
        sigma = update_spectrum(pipe.unet, tuned.unet, name)
        fro = float(np.sqrt((sigma ** 2).sum()))
        if fro == 0:  # not trained in this setting
            continue
        rows.append({"setting": setting, "targets": targets, "via": via, "lambda": lam, "seed": seed, "name": name,
                     "kind": "conv" if p.ndim == 4 else "matrix",
                     "penalised": nuclear_matrix_shape(p.shape, targets) is not None and lam > 0, "rank_90": rank_for_energy(sigma),
                     "full_rank": len(sigma), "nuc_over_fro": float(sigma.sum()) / fro,
                     "flatness": float(sigma.sum()) / fro / math.sqrt(len(sigma)), "final_loss": loss,
                     "cpu_s": cpu})
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(via=df["via"].fillna("adam")) if "via" in df else df.assign(via="adam")
    per_run = df.groupby(["setting", "targets", "via", "lambda", "seed", "kind"]).agg(
        rank_90=("rank_90", "mean"), flatness=("flatness", "mean"), final_loss=("final_loss", "first"),
        weights=("name", "count")).reset_index()
    out = []
    for key, g in per_run.groupby(["setting", "targets", "kind", "lambda", "via"]):
        row = dict(zip(["setting", "targets", "kind", "lambda", "via"], key), seeds=len(g),
                   weights=int(g.weights.iloc[0]))
        for col in ("rank_90", "flatness", "final_loss"):
            h = t_quantile(len(g)) * g[col].std(ddof=1) / math.sqrt(len(g)) if len(g) > 1 else math.nan
            row[col] = f"{g[col].mean():.4g}" + (f" ± {h:.2g}" if np.isfinite(h) else "")
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--style", default="cyberpunk")
    ap.add_argument("--via", choices=("adam", "direct"), default="adam",
                    help="how the term reaches the values (direct: the focus setting at two λ, see above)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/nuclear_lambda.csv (nuclear_via.csv "
                                                "with --via direct)")
    args = ap.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results / ("nuclear_via.csv" if args.via == "direct" else "nuclear_lambda.csv"))
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    pipe, data = load_pretrained(), StyleDataset(args.style)
    settings = DIRECT_SETTINGS if args.via == "direct" else SETTINGS
    jobs = [(s, t, lam, seed) for s, t, lams in settings for lam in lams for seed in args.seeds]
    rows = []
    for setting, targets, lam, seed in tqdm(jobs, desc="runs"):
        rows += run_one(pipe, data, setting, targets, lam, seed, args.steps, args.lr, via=args.via)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from sara_edu.io import atomic_write_bytes

    atomic_write_bytes(out, lambda tmp: df.to_csv(tmp, index=False))
    print(f"{args.steps} steps, lr {args.lr:g}, style {args.style}, seeds {args.seeds}; "
          f"{df.groupby(['setting', 'targets', 'lambda', 'seed']).cpu_s.first().sum() / 60:.1f} CPU-min of training")
    shown = df
    if args.via == "direct" and (results / "nuclear_lambda.csv").exists():  # beside the AdamW runs it varies
        adam = pd.read_csv(results / "nuclear_lambda.csv")
        adam = adam[(adam.setting == "focus") & adam["lambda"].isin([0.0, *DIRECT_SETTINGS[0][2]])
                    & adam.seed.isin(args.seeds)]
        shown = pd.concat([adam, df], ignore_index=True)
    print(summary(shown).to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
