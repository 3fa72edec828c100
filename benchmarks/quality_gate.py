"""The quality gate in numbers: real images pass, corrupted ones and noisy samples do not.

    python benchmarks/quality_gate.py            # the gate's pass rates + notebook 04's QUICK models

1. Per look, the pass rate of the validation half of the held-out real images
   (the gate was calibrated on the other half) and of their corruptions (noise,
   pixel-shuffled, 3x3 blur): the targets are >= 95% and <= 5%.
2. Notebook 04's QUICK setting (30 steps, batch 16, each method at the study's
   rate, cyberpunk): samples of "a digit k, cyberpunk style" for k = 0-6, with
   the prompt agreement as before, the share that passes the gate, and the
   agreement counting only those. A sample grid marks each image pass / reject,
   so a reader sees what the numbers score.

Results: tables on stdout, ``benchmarks/results/quality_gate.csv`` and
``benchmarks/results/quality_gate_samples.png``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.lessons import sara_vs_lora as lesson  # noqa: E402
from sara_edu.world.metrics import prompt_agreement  # noqa: E402
from sara_edu.world.model import generate, load_pretrained  # noqa: E402
from sara_edu.world.quality import gate_report, load_gate  # noqa: E402
from sara_edu.world.text import make_prompt  # noqa: E402

STYLE, DIGITS, PER_DIGIT = "cyberpunk", range(7), 6


def main():
    torch.set_num_threads(1)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = gate_report()
    print("Pass rate per look (validation half of the held-out real images, and their corruptions):")
    print(report.pivot(index="look", columns="set", values="pass_rate").round(3).to_string())

    pipe = load_pretrained()
    comparison = lesson.finetune_methods(pipe, STYLE, lesson.DEFAULT_METHODS, steps=30,
                                         lr=lesson.study_learning_rates(), batch_size=16, fraction=0.1,
                                         progress=False)
    models = {"pretrained": pipe, **{name: run.pipe for name, run in comparison.runs.items()}}
    wanted = [d for d in DIGITS for _ in range(PER_DIGIT)]
    prompts = [make_prompt(d, STYLE) for d in wanted]
    gate, rows, shown = load_gate(), [], {}
    for name, model in models.items():
        images = generate(model, prompts, steps=10, seed=0)
        scores = prompt_agreement(images, wanted, STYLE, per_image=True)
        passed = gate.passes(images, STYLE)
        rows.append({"set": f"QUICK {name}", "look": STYLE, "n": len(images),
                     "digit_acc": float(scores["digit_acc"].double().mean()),
                     "agreement": float(scores["agreement"].double().mean()),
                     "pass_rate": float(passed.double().mean()),
                     "gated_agreement": float((scores["agreement"] & passed).double().mean())})
        shown[name] = (images[::PER_DIGIT // 2], passed[::PER_DIGIT // 2], scores["agreement"][::PER_DIGIT // 2])
    samples = pd.DataFrame(rows)
    print(f"\nNotebook 04's QUICK models, '{STYLE}' digits 0-6, {PER_DIGIT} samples each:")
    print(samples.round(3).to_string(index=False))
    table = pd.concat([report, samples], ignore_index=True)
    from sara_edu.io import atomic_write_bytes

    atomic_write_bytes(out / "quality_gate.csv", lambda tmp: table.to_csv(tmp, index=False))
    _grid(shown, out / "quality_gate_samples.png")
    print(f"wrote {out / 'quality_gate.csv'} and {out / 'quality_gate_samples.png'}")


def _grid(shown: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from sara_edu.io import atomic_write_bytes

    fig = lesson.gate_figure(shown)
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


if __name__ == "__main__":
    main()
