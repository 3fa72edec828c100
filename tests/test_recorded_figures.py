"""Numbers the notebooks quote from committed benchmark records are the records' numbers."""
import json
import re

import pandas as pd
import pytest

from sara_edu.world.paths import REPO_ROOT

NUCLEAR = REPO_ROOT / "benchmarks" / "results" / "nuclear_lambda.csv"


def _markdown(notebook: str) -> str:
    cells = json.loads((REPO_ROOT / "notebooks" / notebook).read_text())["cells"]
    return re.sub(r"\s+", " ", " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"))


@pytest.mark.skipif(not NUCLEAR.exists(), reason="an installed wheel has no benchmarks/")
def test_notebook_03_quotes_the_lambda_sweep_as_recorded():
    d = pd.read_csv(NUCLEAR)
    per_run = d.groupby(["setting", "targets", "kind", "lambda", "seed"]).agg(
        rank_90=("rank_90", "mean"), ratio=("nuc_over_fro", "mean"), loss=("final_loss", "first"))
    mean = per_run.groupby(level=[0, 1, 2, 3]).mean()

    def focus(lam, col):
        return mean.loc[("focus", "2d", "matrix", lam), col]

    def whole(targets, kind, lam):
        return mean.loc[("whole", targets, kind, lam), "rank_90"]

    text = _markdown("03_sara_step_by_step.ipynb")
    expected = [
        f"`rank_90` {focus(0.0, 'rank_90'):.0f} at λ = 0, {focus(5e-4, 'rank_90'):.1f} at 5e-4, "
        f"{focus(2e-3, 'rank_90'):.0f} at 2e-3 and {focus(5e-3, 'rank_90'):.0f} at 5e-3",
        f"(nuclear/Frobenius {focus(0.0, 'ratio'):.1f}, {focus(5e-4, 'ratio'):.1f}, {focus(2e-3, 'ratio'):.1f} and "
        f"{focus(5e-3, 'ratio'):.1f})",
        f"loss rose from {focus(0.0, 'loss'):.2f} (λ = 0) to {focus(5e-4, 'loss'):.2f} at 5e-4 and "
        f"{focus(5e-3, 'loss'):.2f} at 5e-3",
        f"`rank_90` fell only from {whole('2d', 'matrix', 0.0):.0f} to {whole('2d', 'matrix', 5e-4):.0f}",
        f"({whole('2d', 'conv', 0.0):.0f} with or without the term; with `nuclear_targets=\"conv\"`, "
        f"{whole('conv', 'conv', 5e-4):.0f})",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"notebook 03 should say {missing} (from {NUCLEAR.name}); rerun or update the prose"
    assert round(whole("2d", "conv", 5e-4)) == round(whole("2d", "conv", 0.0))  # "with or without"


VIA = REPO_ROOT / "benchmarks" / "results" / "nuclear_via.csv"


@pytest.mark.skipif(not VIA.exists(), reason="an installed wheel has no benchmarks/")
def test_notebook_03_quotes_the_direct_nuclear_step_as_recorded():
    """'as its own step ... λ = 5e-4 and even 5e-3 leave rank_90 at 47.9, as without the term'."""
    adam, direct = pd.read_csv(NUCLEAR), pd.read_csv(VIA)
    adam = adam[(adam.setting == "focus") & adam.seed.isin(direct.seed.unique())]

    def rank(d, lam):
        return d[d["lambda"] == lam].groupby("seed").rank_90.mean().mean()

    text = _markdown("solutions/03_sara_step_by_step.ipynb")
    assert round(rank(direct, 5e-4), 1) == round(rank(direct, 5e-3), 1) == round(rank(adam, 0.0), 1)
    assert (f"leave `rank_90` at {rank(direct, 5e-4):.1f} of 64, as without the term, where through AdamW they "
            f"bring it to {rank(adam, 5e-4):.1f} and {rank(adam, 5e-3):.1f}") in text


BUDGET = REPO_ROOT / "reports" / "budget_methods.csv"


@pytest.mark.skipif(not BUDGET.exists(), reason="an installed wheel has no reports/")
def test_the_readme_quotes_the_budget_per_method_as_recorded():
    curve = pd.read_csv(BUDGET).set_index(["method", "style", "step"])
    readme = re.sub(r"\s+", " ", (REPO_ROOT / "README.md").read_text())
    lora = curve.loc[("lora_matched", "elementfire")]
    quoted = (f"(prompt agreement {lora.at[800, 'agreement']:.2f} at step 800, "
              f"{lora.at[1600, 'agreement']:.2f} at 1600)")
    assert quoted in readme
    for method in ("sara", "full"):  # "had saturated by step 800": less than 0.05 gained after it
        for style in ("elementfire", "hornify"):
            c = curve.loc[(method, style)]
            assert c.at[1600, "agreement"] - c.at[800, "agreement"] < 0.05, (method, style)
    assert curve.loc[("lora_matched", "hornify", 1600), "loss"] < curve.loc[("lora_matched", "hornify", 800), "loss"]
    minutes = pd.read_csv(BUDGET).groupby(["method", "style"]).minutes.max().sum()
    assert f"{minutes:.0f} min of run time" in readme


RESET = REPO_ROOT / "benchmarks" / "results" / "reset_moments.csv"


@pytest.mark.skipif(not RESET.exists(), reason="an installed wheel has no benchmarks/")
def test_notebook_03_quotes_the_moment_reset_as_recorded():
    import math

    from sara_edu.study.stats import t_quantile

    d = pd.read_csv(RESET)
    diff = d.loss_reset - d.loss_keep
    half = t_quantile(len(d)) * diff.std(ddof=1) / math.sqrt(len(d))
    text = _markdown("solutions/03_sara_step_by_step.ipynb")
    assert (f"changes the final training loss by {diff.mean():+.4f} ± {half:.4f} (of {d.loss_keep.mean():.3f})"
            .replace("-", "−") in text)
    assert f"end {d.apart_over_moved.mean():.0%} of their update apart" in text and f"{len(d)} seeds" not in text
    assert len(d) == 3 and "three seeds" in text


RESULTS = REPO_ROOT / "benchmarks" / "results"


@pytest.mark.skipif(not (RESULTS / "memory_time_cpu_sd15_step32.csv").exists(),
                    reason="an installed wheel has no benchmarks/")
def test_the_readme_quotes_how_the_step_runs_as_recorded():
    """Issue 21's figures in the README are the committed benchmark CSVs' (tables, ratios, memory)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.sub(r"\s+", " ", readme[readme.index("### How the step runs"):readme.index("### On a GPU")])
    table = pd.read_csv(RESULTS / "memory_time_cpu_sd15_step32.csv").set_index("key")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in readme[readme.index("### How the step runs"):readme.index("### On a GPU")].splitlines()
            if line.strip().startswith("| ")}
    for key, label in [("plain", "plain fwd+bwd"), ("full", "full fine-tuning"), ("sara", "SaRA exact"),
                       ("sara-compiled", "SaRA exact, compiled"), ("sara-compact", "SaRA `compact=True`"),
                       ("sara-backward", "SaRA exact, step in backward, compiled"),
                       ("sara-compact-compiled", "SaRA compact, compiled")]:
        row = table.loc[key]
        state = "-" if key == "plain" else f"{row['state per trained entry (B)']:.2f}"
        expected = [state, f"{row['tracker peak above frozen (MB)']:,.0f}",
                    f"{row['peak RSS above loaded model (MB)']:,.0f}", f"{row['median step CPU (s)']:.1f}"]
        assert rows[label][:4] == expected and rows[label][5:] == [f"{row['x plain fwd+bwd']:.2f}",
                                                                 f"{row['x full fine-tuning']:.2f}"], (key, rows[label])
    phases = {side: pd.read_csv(RESULTS / f"step_phases_cpu_{side}_exact.csv").set_index("key")["x plain"]
              for side in (32, 64)}
    assert (f"SaRA exact {phases[32]['sara']:.2f}×, compiled {phases[32]['sara-compiled']:.2f}×, step in backward "
            f"(compiled) {phases[32]['sara-backward']:.2f}× plain") in section
    assert (f"SaRA exact {phases[64]['sara']:.2f}×, compiled {phases[64]['sara-compiled']:.2f}×, step in backward "
            f"(compiled) {phases[64]['sara-backward']:.2f}×") in section
    compact = pd.read_csv(RESULTS / "step_phases_cpu_64_compact.csv").set_index("key")["x plain"]
    assert (f"SaRA compact {compact['sara-compact']:.2f}×, compiled {compact['sara-compact-compiled']:.2f}×, step in "
            f"backward (compiled) {compact['sara-compact-backward']:.2f}×") in section
    speed = pd.read_csv(RESULTS / "compact_step_speed_cpu.csv").set_index("option")["x exact"]
    assert (f"took {speed['exact compiled']:.2f}× the stock exact step, "
            f"{speed['no value copy compiled'] / speed['no value copy (fp32 moments)']:.2f}× the no-copy one and "
            f"{speed['compact (bf16) compiled'] / speed['compact (bf16)']:.2f}× the compact one") in section
    ckpt = pd.read_csv(RESULTS / "memory_time_cpu_sd15_checkpointing.csv").set_index("key")
    a, b = ckpt.loc["sara"], ckpt.loc["sara-backward-eager"]
    assert (f"tracker {a['tracker peak above frozen (MB)']:,.0f} → {b['tracker peak above frozen (MB)']:,.0f} MB, "
            f"peak RSS {a['peak RSS above loaded model (MB)']:,.0f} → {b['peak RSS above loaded model (MB)']:,.0f} MB"
            ) in section
    assert (f"{a['peak RSS above loaded model, fixed mmap threshold (MB)']:,.0f} → "
            f"{b['peak RSS above loaded model, fixed mmap threshold (MB)']:,.0f} MB with a fixed mmap") in section
    saving = {c: a[c] - b[c] for c in ("tracker peak above frozen (MB)", "peak RSS above loaded model (MB)",
                                       "peak RSS above loaded model, fixed mmap threshold (MB)")}
    assert (f"{saving['tracker peak above frozen (MB)']:.0f} MB lower on the tracker, "
            f"{saving['peak RSS above loaded model, fixed mmap threshold (MB)']:.0f} MB lower in peak RSS with a fixed "
            f"mmap threshold, {saving['peak RSS above loaded model (MB)']:.0f} MB with glibc's default") in section
    runs = RESULTS / "memory_time_cpu_sd15_checkpointing_repeat2_runs"
    rss = {path.stem: json.loads(path.read_text())["peak RSS above loaded model (MB)"] for path in runs.glob("*.json")}
    for run in ("round1", "round2"):
        a, b = rss[f"sd15_sara_{run}_steps2"], rss[f"sd15_sara-backward-eager_{run}_steps2"]
        assert f"{a:,.0f} → {b:,.0f} MB ({a - b:.0f} MB lower) in {run.replace('round', 'round ')}" in section
    a, b = rss["sd15_sara_fixed-mmap_steps2"], rss["sd15_sara-backward-eager_fixed-mmap_steps2"]
    assert f"1,764 → 1,473 MB again, {a:,.0f} → {b:,.0f} MB with the fixed threshold" in section


def test_the_suite_cost_record_parses_row_by_row():
    # a label with a comma, written unquoted, once shifted a row's columns (pandas then read it without an error)
    table = pd.read_csv(RESULTS / "suite_cost.csv")
    assert list(table.columns) == ["date", "commit", "label", "load_processes", "pytest_args", "wall", "user_s",
                                   "system_s", "cpu_min", "max_rss_kb", "exit", "pytest"]
    assert table.index.equals(pd.RangeIndex(len(table)))
    assert table["commit"].str.fullmatch(r"[0-9a-f]{7,}").all()
    assert table["load_processes"].dtype.kind == "i" and table["cpu_min"].dtype.kind == "f"
    assert table["pytest"].str.contains("passed|failed|stopped").all()
