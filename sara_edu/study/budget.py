"""How long must a run be? Full fine-tuning's style agreement along one long run per style.

The study's comparison means something only where the strongest baseline has
learned the style: a method that "loses" on a style nobody learned says
nothing. This trains full fine-tuning once per style and scores the style
(prompt agreement on the fine-tuning digits) at a few points of the run; the
study's budget is the first point where every style reaches the target::

    python -m sara_edu.study budget --steps 100 200 400 800 --out reports/budget.csv

``--methods`` draws the same curve for other methods, each at the rate the
study chose for it (``CHOSEN_LRS``, and ``CONTROLS_CHOSEN_LRS`` for the controls), with the training loss beside the
agreement, so that no method is judged before it has saturated::

    python -m sara_edu.study budget --methods sara lora_matched full --styles elementfire hornify \
        --steps 100 200 400 800 1600 --out reports/budget_methods.csv
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .config import FULL, StudyConfig

TARGET_AGREEMENT = 0.8  # the bar: full fine-tuning learns every style


def budget_curve(config: StudyConfig = FULL, checkpoints=(100, 200, 400, 800), lr: float = 3e-4,
                 styles=None, seed: int = 0, model=None, progress: bool = True, method: str = "full") -> pd.DataFrame:
    """One row per (style, step): agreement, digit and look accuracy, FID analogue and training loss of
    ``method`` (a study method key; default full fine-tuning) at ``lr``.

    The learning-rate schedule is the cosine of the *longest* run, so a point part-way is
    a snapshot of that run, not a shorter run of its own (those would decay sooner).
    ``loss`` is the mean training loss of the 20 steps up to the point.
    """
    from ..training import train
    from ..world.data import StyleDataset
    from .run import _base_pipe, evaluate_run, make_method, method_spec

    checkpoints = sorted(int(c) for c in checkpoints)
    rows = []
    for style in styles or config.styles:
        pipe = copy.deepcopy(_base_pipe(model))
        data = StyleDataset(style, split="train", limit_per_digit=config.limit_per_digit)
        start = time.perf_counter()

        def score(step, pipe_, optimizer, style=style):
            if step in checkpoints:
                pipe_.unet.eval()
                scores = evaluate_run(pipe_, style, seed, replace(config, eval_plain_per_digit=1), model)
                pipe_.unet.train()
                rows.append({"method": method, "style": style, "step": step, "lr": lr,
                             "agreement": scores["agreement"],
                             "digit_acc": scores["digit_acc"], "look_acc": scores["look_acc"], "fid": scores["fid"],
                             "minutes": (time.perf_counter() - start) / 60})
                if progress:
                    print(f"{style:12s} step {step:5d}: agreement {scores['agreement']:.2f} "
                          f"(digit {scores['digit_acc']:.2f}, look {scores['look_acc']:.2f})", flush=True)

        trainer = make_method(method_spec(config, method, style, seed, lr), _base_pipe(model).unet, config)
        history = train(pipe, data, trainer, steps=checkpoints[-1], lr=lr, batch_size=config.batch_size, seed=seed,
                        progress=False, callback=score)
        for row in rows:
            if row["style"] == style and "loss" not in row:
                row["loss"] = float(history.loss[(history.step > row["step"] - 20) & (history.step <= row["step"])]
                                    .mean())
    return pd.DataFrame(rows)


def shortest_budget(curve: pd.DataFrame, target: float = TARGET_AGREEMENT) -> int | None:
    """The first step at which every style's agreement is at least ``target`` (None if never)."""
    by_step = curve.groupby("step").agreement.min()
    reached = by_step[by_step >= target]
    return int(reached.index.min()) if len(reached) else None


def chosen_rates() -> dict[str, float]:
    """Each method's searched learning rate: the full study's choices and the controls study's."""
    from .config import CHOSEN_LRS, CONTROLS_CHOSEN_LRS

    return {**CHOSEN_LRS, **CONTROLS_CHOSEN_LRS}


def main(args) -> None:
    from ..io import atomic_write_bytes

    rates = chosen_rates()
    methods = args.methods or ["full"]
    unknown = [m for m in methods if m not in rates]
    if unknown:
        raise SystemExit(f"--methods: no chosen learning rate for {unknown}; choose from {sorted(rates)}")
    curves = []
    for m in methods:
        lr = args.lr if args.methods is None else rates[m]
        curves.append(budget_curve(checkpoints=args.steps, lr=lr, styles=args.styles or None, progress=True,
                                   method=m))
    curve = pd.concat(curves, ignore_index=True)
    out = Path(args.out)
    atomic_write_bytes(out, lambda tmp: curve.to_csv(tmp, index=False, float_format="%.4g"))
    print(curve.pivot_table(index="step", columns=["method", "style"], values="agreement").round(2).to_string())
    if args.methods is None:
        print(f"shortest budget with every style >= {TARGET_AGREEMENT}: {shortest_budget(curve)} steps; wrote {out}")
    else:
        print(f"wrote {out}")
