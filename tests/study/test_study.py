"""The study runner (grid, CSV, resume) and its report.

The QUICK grid runs end to end on a tiny randomly initialised course model
(saved to a temporary folder, so the test does not depend on the shipped
weights); the report is checked on a synthetic CSV whose numbers we know.
"""
import dataclasses
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from sara_edu.errors import ConfigError, DataError
from sara_edu.study import run as study
from sara_edu.study.__main__ import main as study_main
from sara_edu.study.config import (
    PRETRAINED,
    QUICK,
    SCHEMA,
    StudyConfig,
    read_results,
    write_results,
)
from sara_edu.study.report import write_report
from sara_edu.study.select import main_rows

EXPECTED_RUNS = 1 + len(QUICK.methods)  # the pretrained reference + one run per method
_REAL_RUN_ONE = study.run_one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sara_edu.world.model import TinyDiffusion, build_unet, save_pretrained
    from sara_edu.world.text import TinyTextEncoder

    folder = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0)), folder)
    return str(folder)


@pytest.fixture(scope="module")
def quick_csv(model_dir, tmp_path_factory):
    """The QUICK study, run once through the command line."""
    out = tmp_path_factory.mktemp("quick") / "results.csv"
    study_main(["run", "--quick", "--out", str(out), "--model", model_dir, "--no-progress"])
    return out


def _count_runs(monkeypatch, fail_on=None):
    """Count run_one calls (optionally raising on the ``fail_on``-th one, like a crash mid-grid)."""
    calls = []
    real = _REAL_RUN_ONE  # not study.run_one: that may be an earlier wrapper

    def counting(spec, config, model=None):
        calls.append(spec)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("simulated crash")
        return real(spec, config, model)

    monkeypatch.setattr(study, "run_one", counting)
    return calls


def test_quick_study_writes_the_documented_schema(quick_csv, model_dir):
    df = pd.read_csv(quick_csv)
    assert list(df.columns) == list(SCHEMA)
    typed = read_results(quick_csv)
    checks = {"str": pd.api.types.is_string_dtype, "int": pd.api.types.is_integer_dtype,
              "float": pd.api.types.is_float_dtype}
    for col, kind in SCHEMA.items():
        assert checks[kind](typed[col]), (col, typed[col].dtype)
    assert len(typed) == EXPECTED_RUNS
    assert typed.run_id.is_unique
    assert sorted(typed.method) == sorted([PRETRAINED, *QUICK.methods])
    assert set(typed.status) == {"ok"}
    trained = typed[typed.method != PRETRAINED].set_index("method")
    # independent references: SaRA trains 10% of the UNet's numbers, LoRA r=4 on the attention
    # projections r * (in + out) per layer, counted from the model's own layers
    from sara_edu.world.model import load_pretrained

    unet = load_pretrained(model_dir).unet
    total = sum(p.numel() for p in unet.parameters())
    assert abs(trained.at["sara", "trainable_params"] - 0.1 * total) <= 0.01 * total
    lora = sum(4 * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    assert trained.at["lora_r4", "trainable_params"] == lora
    assert (trained.peak_memory_mb > 0).all() and (trained.file_size_bytes > 0).all()
    assert (trained.steps == QUICK.steps).all() and (trained.step_time_s > 0).all()
    # SaRA's file holds ~10% of the values plus their positions: far less than the full model
    assert trained.at["sara", "file_size_bytes"] < 0.5 * 4 * total
    for prefix in ("", "unseen_", "plain_"):
        assert typed[f"{prefix}fid"].ge(0).all()
        assert typed[f"{prefix}agreement"].between(0, 1).all()
    # the pretrained reference's plain samples are the reference: no change
    assert typed.loc[typed.method == PRETRAINED, "plain_drift"].item() == 0
    assert (trained.plain_drift > 0).all()


def test_second_invocation_skips_finished_runs(quick_csv, model_dir, monkeypatch, tmp_path):
    out = tmp_path / "again.csv"
    shutil.copy(quick_csv, out)
    before = out.read_bytes()
    calls = _count_runs(monkeypatch)
    study.run_study(QUICK, out, model=model_dir, progress=False)
    assert calls == []
    assert out.read_bytes() == before


def test_interrupted_study_keeps_finished_rows_and_resumes(model_dir, monkeypatch, tmp_path):
    out = tmp_path / "interrupted.csv"
    calls = _count_runs(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        study.run_study(QUICK, out, model=model_dir, progress=False)
    first = read_results(out)  # valid, with the one finished run
    assert len(first) == 1 and first.status.item() == "ok"
    calls = _count_runs(monkeypatch)  # no more crashes
    done = study.run_study(QUICK, out, model=model_dir, progress=False)
    assert len(calls) == EXPECTED_RUNS - 1  # only what was missing
    assert first.run_id.item() not in {s.run_id(QUICK) for s in calls}
    assert len(done) == EXPECTED_RUNS and read_results(out).run_id.is_unique
    pd.testing.assert_series_equal(read_results(out).iloc[0], first.iloc[0], check_names=False)


def test_quick_report_renders(quick_csv, tmp_path):
    path = write_report(quick_csv, tmp_path / "quick.md")
    text = path.read_text()
    assert "| method | cyberpunk<br>FID↓ | cyberpunk<br>Agr↑ | cyberpunk<br>VLHI↑ | mean<br>FID↓" in text
    assert (tmp_path / "quick_table1.png").stat().st_size > 1000  # figures are named after their report


# --------------------------------------------------------------------------- report on known numbers


def _synthetic(tmp_path):
    """Three methods x two styles x two seeds, with FID/agreement chosen so VLHI is known."""
    base = {c: (0 if k == "int" else math.nan if k == "float" else "") for c, k in SCHEMA.items()}
    rows = []
    fids = {"sara": 1.0, "lora_r4": 2.0, "full": 3.0}
    agree = {"sara": 0.5, "lora_r4": 0.9, "full": 0.1}
    for style in ("barbiecore", "hornify"):
        for seed in (0, 1):
            rows.append({**base, "run_id": f"p{style}{seed}", "study": "t", "phase": "pretrained",
                         "method": PRETRAINED, "style": style, "seed": seed, "status": "ok", "fid": 9.0,
                         "agreement": 0.0, "plain_agreement": 1.0, "machine": "test box",
                         "finished_utc": "2026-01-01T00:00:00Z", "eval_time_s": 1.0})
            for m in fids:
                shift = 0.5 * seed + (1 if style == "hornify" else 0)
                rows.append({**base, "run_id": f"{m}{style}{seed}", "study": "t", "phase": "main", "method": m,
                             "style": style, "seed": seed, "lr": 1e-3, "steps": 10, "batch_size": 4,
                             "limit_per_digit": 2, "n_train_images": 14, "status": "ok",
                             "fid": fids[m] + shift, "agreement": agree[m], "plain_agreement": 0.8,
                             "unseen_agreement": 0.2, "trainable_params": {"full": 1000}.get(m, 100),
                             "peak_memory_mb": 5.0, "step_time_s": 0.1, "file_size_bytes": 2048,
                             "eval_per_digit": 2, "eval_plain_per_digit": 1, "eval_steps": 4,
                             "guidance_scale": 3.0, "machine": "test box", "train_time_s": 2.0,
                             "eval_time_s": 1.0, "finished_utc": f"2026-01-01T00:0{seed + 1}:00Z"})
    rows.append({**rows[-1], "run_id": "diverged", "status": "diverged", "fid": math.nan, "seed": 5})
    path = tmp_path / "synthetic.csv"
    write_results(pd.DataFrame(rows, columns=list(SCHEMA)), path)
    return path


def test_report_has_the_table1_layout_with_known_numbers(tmp_path):
    csv = _synthetic(tmp_path)
    rows = main_rows(read_results(csv))
    # VLHI by hand: fid 1,2,3 -> (3-f)/2 = 1, .5, 0; agreement .5,.9,.1 -> (a-.1)/.8 = .5, 1, 0
    expected = {"sara": 1.5, "lora_r4": 1.5, "full": 0.0}
    for m, v in expected.items():
        assert np.allclose(rows.loc[rows.method == m, "vlhi"], v)
    text = write_report(csv, tmp_path / "report" / "study.md").read_text()
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("| method | barbiecore"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["method"] + [f"{s}<br>{m}" for s in ("barbiecore", "hornify", "mean")
                                  for m in ("FID↓", "Agr↑", "VLHI↑")]
    body = lines[lines.index(header) + 2: lines.index(header) + 6]
    assert [b.split("|")[1].strip() for b in body] == ["pretrained (no fine-tuning)", "SaRA", "LoRA r=4",
                                                        "full fine-tuning"]
    sara = [c.strip() for c in body[1].strip("|").split("|")]
    # barbiecore FID over seeds 0, 1: 1.0 and 1.5 -> mean 1.25, std 0.35; best (lowest) -> bold
    assert sara[1] == "**1.25 ± 0.35**"
    # mean over styles per seed: (1+2)/2=1.5 and (1.5+2.5)/2=2 -> 1.75 ± 0.35
    assert sara[7] == "**1.75 ± 0.35**"
    assert sara[9] in ("**1.5 ± 0**", "**1.5 ± 0.0**")
    full = [c.strip() for c in body[3].strip("|").split("|")]
    assert full[2] == "0.1 ± 0"  # agreement, not bold (LoRA's 0.9 is best)
    assert "Machine:** test box" in text
    for name in ("study_table1.png", "study_tradeoff.png", "study_cost.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def _search_rows(config, numbers):
    """Result rows for the search: numbers[(method, lr)] = [(fid, agreement, status) per search pair]."""
    rows = []
    for (m, lr), per_pair in numbers.items():
        for (style, seed), (fid, agr, status) in zip(config.lr_search_pairs, per_pair):
            spec = study.method_spec(config, m, style, seed, lr)
            rows.append({"run_id": spec.run_id(config), "status": status, "fid": fid, "agreement": agr})
    return pd.DataFrame(rows)


def test_lr_choice_uses_vlhi_among_candidates_and_skips_diverged():
    config = StudyConfig(name="t", methods=("sara", "full"), styles=("cyberpunk",), seeds=(0,),
                         lr_grid=(("sara", (1e-3, 3e-3, 1e-2)), ("full", (1e-4, 3e-4, 1e-3))), lr_extensions=0)
    ok, div = "ok", "diverged"
    numbers = {("sara", 1e-3): [(5.0, 0.2, ok)], ("sara", 3e-3): [(3.0, 0.6, ok)],
               ("sara", 1e-2): [(math.nan, math.nan, div)],
               ("full", 1e-4): [(4.0, 0.9, ok)], ("full", 3e-4): [(2.0, 0.1, ok)], ("full", 1e-3): [(6.0, 0.5, ok)]}
    rows = _search_rows(config, numbers)
    chosen = study.choose_lrs(config, rows)
    # sara: 3e-3 wins on both; full: 1e-4 -> (1/2 + 1) = 1.5, 3e-4 -> (1 + 0) = 1, 1e-3 -> (0 + .5) = .5
    assert chosen == {"sara": 3e-3, "full": 1e-4}
    with pytest.raises(DataError, match="no result yet"):
        study.choose_lrs(config, rows.iloc[:2])


def test_lr_search_averages_over_pairs_and_widens_off_an_edge():
    config = StudyConfig(name="t", methods=("sara",), styles=("cyberpunk", "hornify"), seeds=(0, 1),
                         lr_grid=(("sara", (1e-3, 3e-3, 1e-2)),),
                         lr_search_pairs=(("cyberpunk", 0), ("hornify", 1)), lr_extensions=2)
    ok = "ok"
    # pair 1 prefers 1e-3 strongly, pair 2 mildly prefers 3e-3: the mean picks the smallest -> an edge
    numbers = {("sara", 1e-3): [(1.0, 0.9, ok), (2.0, 0.5, ok)], ("sara", 3e-3): [(2.0, 0.5, ok), (1.0, 0.6, ok)],
               ("sara", 1e-2): [(3.0, 0.1, ok), (3.0, 0.1, ok)]}
    rows = _search_rows(config, numbers)
    # VLHI per pair: pair 1 (fid 1,2,3; agr .9,.5,.1) -> 2, 1, 0; pair 2 (fid 2,1,3 -> .5,1,0; agr .5,.6,.1 ->
    # .8,1,0) -> 1.3, 2, 0. Mean: 1.65, 1.5, 0 -> 1e-3, the grid's smallest: widen downwards
    assert study.lr_candidates(config, rows) == {"sara": [0.000333, 1e-3, 3e-3, 1e-2]}
    specs = study.lr_search_specs(config, rows)
    assert {(s.lr, s.style, s.seed) for s in specs} >= {(0.000333, "cyberpunk", 0), (0.000333, "hornify", 1)}
    with pytest.raises(DataError, match="no result yet"):  # the widened candidate must run first
        study.choose_lrs(config, rows)
    # the new candidate is worse on both pairs: 1e-3 is now interior and chosen, no further widening
    numbers[("sara", 0.000333)] = [(4.0, 0.2, ok), (4.0, 0.2, ok)]
    rows = _search_rows(config, numbers)
    assert study.lr_candidates(config, rows) == {"sara": [0.000333, 1e-3, 3e-3, 1e-2]}
    assert study.choose_lrs(config, rows) == {"sara": 1e-3}
    # widening stops after lr_extensions steps even if the best is still the edge
    numbers[("sara", 0.000333)] = [(0.5, 1.0, ok), (0.5, 1.0, ok)]
    numbers[("sara", 0.000111)] = [(0.1, 1.0, ok), (0.1, 1.0, ok)]
    rows = _search_rows(config, numbers)
    assert study.lr_candidates(config, rows) == {"sara": [0.000111, 0.000333, 1e-3, 3e-3, 1e-2]}
    assert study.choose_lrs(config, rows) == {"sara": 0.000111}


def test_ablations_take_saras_rate_and_prior_runs_mix_plain_prompts():
    config = StudyConfig(name="t", methods=("sara", "full"), styles=("cyberpunk", "hornify"), seeds=(0, 1),
                         lr_grid=(("sara", (1e-3,)), ("full", (1e-4,))), ablations=("sara_no_progressive",),
                         ablation_styles=("hornify",), prior_methods=("full",), prior_styles=("cyberpunk",))
    lrs = study.choose_lrs(config, read_results(config.name + "-missing.csv"))
    assert lrs == {"sara": 1e-3, "full": 1e-4, "sara_no_progressive": 1e-3}
    specs = study.main_specs(config, lrs)
    assert [s.seed for s in specs] == sorted(s.seed for s in specs)  # seed-major
    ablation = [s for s in specs if s.method == "sara_no_progressive"]
    assert {(s.style, s.seed, s.lr) for s in ablation} == {("hornify", 0, 1e-3), ("hornify", 1, 1e-3)}
    prior = [s for s in specs if s.prior]
    assert {(s.method, s.style, s.seed) for s in prior} == {("full", "cyberpunk", 0), ("full", "cyberpunk", 1)}
    plain = study.method_spec(config, "full", "cyberpunk", 0, 1e-4)
    assert prior[0].run_id(config) != plain.run_id(config)
    with pytest.raises(ConfigError, match="prior_methods"):
        dataclasses.replace(config, prior_methods=("lora_r4",))
    with pytest.raises(ConfigError, match="ablations"):
        dataclasses.replace(config, ablation_styles=())


def test_report_claims_ablations_and_prior_preservation_on_known_numbers(tmp_path):
    from sara_edu.study.claims import claims_rows
    from sara_edu.study.tables import prior_table

    df = read_results(_synthetic(tmp_path))
    extra = []
    for seed, shift in ((0, 0.1), (1, 0.3)):
        sara = df[(df.method == "sara") & (df["style"] == "hornify") & (df.seed == seed)].iloc[0]
        # without progressive: a lower (better) FID and 0.1 more agreement on each seed
        extra.append({**sara, "run_id": f"np{seed}", "method": "sara_no_progressive", "fid": sara.fid - 1,
                      "agreement": sara.agreement + 0.1})
        # without the nuclear norm: identical numbers -> no clear difference
        extra.append({**sara, "run_id": f"nn{seed}", "method": "sara_no_nuclear"})
        full = df[(df.method == "full") & (df["style"] == "barbiecore") & (df.seed == seed)].iloc[0]
        extra.append({**full, "run_id": f"pr{seed}", "phase": "prior", "prior": 1,
                      "plain_agreement": full.plain_agreement + shift})
    df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    # ablation rows stay out of Table 1's rows
    assert set(main_rows(df).method) == {"sara", "lora_r4", "full"}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "claims_inputs.csv").write_text(
        "claim,measure,value\nzeroing,fid_at_0,100\nzeroing,agreement_at_0,1\nzeroing,fid_at_10,110\n"
        "zeroing,agreement_at_10,1\nzeroing,fid_at_20,200\nzeroing,agreement_at_20,0.9\n")
    claims = {r[0]: r for r in claims_rows(df, tmp_path)}
    assert claims["The smallest 10-20% of the weights can be zeroed with little change"][2].startswith(
        "held up to 10%, not at 20%")
    # SaRA's FID is 1 lower than LoRA's on every pair: held; agreement .5 vs .9 on every pair: the opposite
    assert claims["SaRA beats LoRA on the FID analogue"][2] == "held"
    assert claims["SaRA beats LoRA on prompt agreement (CLIP-score analogue)"][2] == "did not hold (the opposite)"
    # identical numbers: the interval is [0, 0], inside the 0.05 margin: equivalent, so "reduces" did not hold
    assert claims["The nuclear-norm term reduces overfitting"][2] == "did not hold (equivalent within the margin 0.05)"
    assert claims["Progressive adjustment helps"][2] == "did not hold (the opposite)"
    assert "prompt agreement −0.1 ± 0 over 2" in claims["Progressive adjustment helps"][3]
    # each row quotes the paper's sentence it checks (or says there is none)
    assert "nuclear-norm-based low-rank sparse training" in claims["The nuclear-norm term reduces overfitting"][4]
    assert all(r[4].startswith(("\u201c", "(no single sentence")) for r in claims.values())
    # SaRA's VLHI equals LoRA's on every pair (1.5 each): "matches" full fine-tuning is read against a margin
    assert claims["SaRA matches or beats full fine-tuning (VLHI)"][2].startswith("held (95% interval not worse")
    assert claims["SaRA matches or beats full fine-tuning (prompt agreement)"][2].startswith("held")
    text = prior_table(df)
    # full fine-tuning's plain agreement 0.8 -> 0.8 + (0.1, 0.3): +0.2, sd 0.141 over 2 pairs; the 95% t factor
    # with 1 degree of freedom is 12.71 -> ± 1.27: not detectable; 5 pairs would exclude 0 at this mean and sd
    assert "| full fine-tuning | 2 | 0.8 → 1 (+0.2 ± 1.3 ? (~5 pairs))" in text


def test_run_ids_follow_the_settings_not_the_phase():
    a = study.method_spec(QUICK, "sara", "cyberpunk", 0, 3e-3)
    assert a.run_id(QUICK) == study.method_spec(QUICK, "sara", "cyberpunk", 0, 3e-3).run_id(QUICK)
    assert a.run_id(QUICK) != study.method_spec(QUICK, "sara", "cyberpunk", 1, 3e-3).run_id(QUICK)
    assert a.run_id(QUICK) != a.run_id(dataclasses.replace(QUICK, steps=QUICK.steps + 1))
    # SaRA with λ = 0 is the no-nuclear ablation: the sweep reuses that run
    assert study.method_spec(QUICK, "sara", "cyberpunk", 0, 3e-3, rank_lambda=0.0) == \
        study.method_spec(QUICK, "sara_no_nuclear", "cyberpunk", 0, 3e-3)


def test_bad_configs_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="same number of learning-rate candidates"):
        StudyConfig(name="x", methods=("sara", "full"), lr_grid=(("sara", (1e-3,)), ("full", (1e-4, 1e-3))))
    with pytest.raises(ConfigError, match="unknown method"):
        StudyConfig(name="x", methods=("dora",), lr_grid=(("dora", (1e-3,)),))
    with pytest.raises(ConfigError, match="unknown style"):
        StudyConfig(name="x", methods=("full",), styles=("sepia",), lr_grid=(("full", (1e-3,)),))
    bad = tmp_path / "bad.csv"
    bad.write_text("run_id,method\nabc,sara\n")
    with pytest.raises(DataError, match="lacks the study columns"):
        read_results(bad)
    with pytest.raises(DataError, match="no results yet"):
        write_report(tmp_path / "missing.csv", tmp_path / "r.md")


def test_a_results_file_with_a_cut_last_row_names_the_line_and_what_to_do(tmp_path):
    path = _synthetic(tmp_path)
    text = path.read_text()
    lines = text.splitlines()
    path.write_text(text[: len(text) - len(lines[-1]) // 2 - 1])  # an interrupted copy: half of the last row
    with pytest.raises(DataError, match=rf"synthetic.csv, line {len(lines)}: \d+ fields where the header has "
                                        rf"{len(SCHEMA)} \(it is cut short: the file ends there\)\. Delete that line "
                                        r"\(the study runs that run again when resumed\)"):
        read_results(path)
    # a value that is not a number is named by line and column, not by pandas' position in the column
    lines[2] = lines[2].replace(",10,", ",ten,", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"synthetic.csv, line 3: column '\w+' holds 'ten', not an integer\. Fix or "
                                        r"delete that line"):
        read_results(path)


def test_the_study_measures_kid_and_the_gate_and_reads_older_files_without_them(quick_csv, tmp_path):
    df = read_results(quick_csv)
    ok = df[df.status == "ok"]
    assert ok[["kid", "gate_pass", "gated_agreement"]].notna().all().all()
    assert (ok.gated_agreement <= ok.agreement + 1e-12).all() and (ok.gated_agreement <= ok.gate_pass + 1e-12).all()
    # a file written before these columns existed: read with NaN there, not refused
    old = tmp_path / "old.csv"
    df.drop(columns=["kid", "gate_pass", "gated_agreement"]).to_csv(old, index=False)
    again = read_results(old)
    assert list(again.columns) == list(SCHEMA) and again.kid.isna().all()


def test_the_paired_table_adds_kid_and_gated_agreement_where_measured(tmp_path):
    from sara_edu.study.tables import paired_table

    df = read_results(_synthetic(tmp_path))
    assert "style KID↓" not in paired_table(df)
    df["kid"] = df.fid / 100
    df["gated_agreement"] = df.agreement / 2
    table = paired_table(df)
    assert "| style KID↓ | gated agreement↑ |" in table.splitlines()[0] + " |"


def test_the_memory_claims_compare_rows_of_one_run_each(tmp_path):
    from sara_edu.study.claims import MEMORY_LORA_TABLE, MEMORY_TABLE, _memory_claims

    col = "tracker peak above frozen (MB)"
    (tmp_path / MEMORY_TABLE).parent.mkdir(parents=True)
    pd.DataFrame({"key": ["sara", "selective", "lora4"], "method": ["SaRA", "selective", "LoRA r=4"],
                  col: [100.0, 400.0, 20.0]}).to_csv(tmp_path / MEMORY_TABLE, index=False)
    rows = {r[0]: r for r in _memory_claims(tmp_path)}
    assert "SaRA needs less training memory than LoRA (LoRA r=4)" in rows
    assert not any("rank" in k for k in rows)  # not measured: no row
    # the rank-matched LoRA from its own run, against SaRA of that run (110 MB there, not 100)
    pd.DataFrame({"key": ["sara", "lora-matched"], "method": ["SaRA", "LoRA r=9 (matched)"],
                  col: [110.0, 220.0]}).to_csv(tmp_path / MEMORY_LORA_TABLE, index=False)
    rows = {r[0]: r for r in _memory_claims(tmp_path)}
    matched = rows["SaRA needs less training memory than LoRA (LoRA r=9 (matched))"]
    assert matched[2] == "held" and "0.50x" in matched[3]
    assert "0.25x selective" in rows["Unstructured backpropagation saves memory against selective fine-tuning"][3]
    assert "5.00x that of LoRA r=4" in rows["SaRA needs less training memory than LoRA (LoRA r=4)"][3]


def test_the_sample_grid_retrains_the_studys_rows_and_gets_their_numbers_again(quick_csv, model_dir, tmp_path):
    from sara_edu.study.samples import CHECKED, write_samples

    png, table = write_samples(QUICK, quick_csv, tmp_path, style="cyberpunk", seed=0, model=model_dir,
                               progress=False)
    checks = pd.read_csv(table)
    assert list(checks.method) == [PRETRAINED, *QUICK.methods]
    for col in CHECKED:  # the same run_id, trained again: the same numbers (the CSV keeps 6 digits)
        np.testing.assert_allclose(checks[f"retrained_{col}"], checks[f"csv_{col}"], rtol=1e-4, err_msg=col)
    assert (checks.grid_images == 7).all() and checks.grid_pass.between(0, 7).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="style='hornify', seed=0"):  # a pair the study did not run
        write_samples(QUICK, quick_csv, tmp_path, style="hornify", seed=0, model=model_dir, progress=False)


def test_the_seed_count_is_argued_from_the_pairs_each_undecided_comparison_needs(tmp_path):
    from sara_edu.study.claims import seeds_text

    df = read_results(_synthetic(tmp_path))
    df = df[df.status == "ok"]
    # every difference is constant over the pairs: all settled at 4 pairs
    assert "settle every comparison" in seeds_text(df)
    # SaRA's unseen-digit agreement against full fine-tuning: -0.02 ± noise, inside neither verdict at 4 pairs
    noisy = df.copy()
    sara = noisy.method == "sara"
    noisy.loc[sara, "unseen_agreement"] = 0.2 + np.array([-0.1, 0.06, -0.08, 0.04])
    text = seeds_text(noisy)
    assert "SaRA − full fine-tuning on unseen_agreement: about" in text and "2 seeds (4 pairs)" in text
    assert "5 seeds (10 pairs) would" in text
