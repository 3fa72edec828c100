"""The numbers quoted in notebooks/solutions/0[0-2]_*.md, measured on the shipped course model.

    python notebooks/solutions/solution_facts.py       # about 2-4 min on a 2-core CPU

Deterministic (fixed seeds), so a rerun prints the same numbers on the same library
versions. The solutions of notebooks 03-05 quote reports/study.md and the notebooks'
own measured text instead: their exercises need fine-tuning runs.
"""
from __future__ import annotations

import time

import torch

import sara_edu
from sara_edu.lessons import pruning_thresholds as pruning
from sara_edu.lessons import weight_distributions as weights
from sara_edu.world.metrics import per_digit_recognition, prompt_agreement
from sara_edu.world.text import make_prompt


def welcome(pipe) -> None:
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"[00] UNet parameters: {n:,}; 10% of them: {n // 10:,}")
    w = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().abs().flatten()
    for fraction in (0.05, 0.2, 0.5):
        theta = torch.quantile(w, fraction)
        print(f"[00] to_q ({w.numel():,} entries), smallest {fraction:.0%}: {int((w < theta).sum()):,} entries")
    for guidance in (3.0, 0.0):
        table = per_digit_recognition(pipe, n_per_digit=10, seed=0, steps=25, guidance_scale=guidance)
        per_digit = ", ".join(f"{d}: {r:.0%}" for d, r in zip(table.digit, table.recognised))
        print(f"[00] guidance {guidance:g}, 10 samples per digit, recognised as asked: {per_digit}; "
              f"mean {table.recognised.mean():.0%}")
    plain = sara_edu.generate(pipe, [make_prompt(3)] * 10, steps=25, seed=0)
    styled = sara_edu.generate(pipe, [make_prompt(3, "cyberpunk")] * 10, steps=25, seed=0)
    scores = prompt_agreement(styled, 3, "cyberpunk")
    print(f"[00] 'a digit 3, cyberpunk style' on the pretrained model (10 seeds): digit right {scores['digit_acc']:.0%}, "
          f"cyberpunk look {scores['look_acc']:.0%}; mean |pixel difference| to 'a digit 3' "
          f"{(styled - plain).abs().mean():.3f} (pixels in [-1, 1])")


def weight_distributions(pipe) -> None:
    kinds = weights.kind_stats(pipe, threshold=2e-3).assign(
        below=lambda t: (t.frac_below * t.numel).round().astype(int)).set_index("kind")
    print("[01] kinds of layer at θ = 2e-3 (share below θ, number below θ, median |w|):")
    for kind, row in kinds.sort_values("frac_below", ascending=False).iterrows():
        print(f"     {kind:16s} {row.frac_below:6.1%}  {int(row.below):9,d}  of {int(row.numel):9,d}  "
              f"median |w| {row.median_abs:.3f}")
    print(f"[01] all kinds: {int(kinds.below.sum()):,} below θ, conv's share of them {kinds.below['conv'] / kinds.below.sum():.0%}")
    snapshots = weights.pretraining_snapshots()
    for scope in ("global", "per_layer"):
        table = weights.smallest_set_stability(snapshots, 0.1, scope=scope)
        print(f"[01] smallest 10%, scope={scope}: retained " +
              ", ".join(f"{p:.0%}: {r:.0%}" for p, r in zip(table.progress, table.retained)))
    for fraction in (0.01, 0.5):
        table = weights.smallest_set_stability(snapshots, fraction)
        print(f"[01] fraction {fraction:.0%}: chance {table.chance.iloc[0]:.0%}; retained " +
              ", ".join(f"{p:.0%}: {r:.0%}" for p, r in zip(table.progress, table.retained)))


def pruning_thresholds(pipe) -> None:
    overall, _ = pruning.fraction_below(pipe, 2e-3)
    print(f"[02] θ = 2e-3 cuts {overall:.1%} of the course UNet")
    digits = [d for d in range(10) for _ in range(5)]
    prompts = [make_prompt(d) for d in digits]

    def agreement():
        images = sara_edu.generate(pipe, prompts, steps=25, seed=0)
        return prompt_agreement(images, digits)["agreement"]

    theta = pruning.threshold_for_fraction(pipe, 0.1)
    with pruning.prune_below(pipe, theta):
        smallest = agreement()
    generator = torch.Generator().manual_seed(0)
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(torch.rand(p.shape, generator=generator) > 0.1)
    random_ten = agreement()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            p.copy_(before[name])
    print(f"[02] prompt agreement, 5 samples per digit, 25 steps: unpruned {agreement():.0%}, "
          f"smallest 10% zeroed {smallest:.0%}, random 10% zeroed {random_ten:.0%}")
    for seed in (0, 1):
        row = pruning.quality_vs_pruning(pipe, [0.0], n_per_digit=20, steps=25, seed=seed, progress=False).iloc[0]
        print(f"[02] unpruned, full setting (20 per digit, 25 steps), seed {seed}: FID analogue {row.fid:.0f}, "
              f"prompt agreement {row.agreement:.1%}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = sara_edu.load_pretrained()
    welcome(model)
    weight_distributions(model)
    pruning_thresholds(model)
    print(f"({time.perf_counter() - start:.0f} s)")
