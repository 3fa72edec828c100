"""The study's controls that separate where a method trains from how: each trains what it says, as many
numbers as the method it is matched to, and nothing else."""
import math

import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.study import run as study
from sara_edu.study.config import QUICK, WHERE_HOW
from sara_edu.training.lora import ALL_TARGETS, ATTENTION_TARGETS
from sara_edu.training.method import FullFineTuning
from sara_edu.world.model import load_pretrained

ATTENTION_WEIGHT = study.weights_of(ATTENTION_TARGETS)


@pytest.fixture(scope="module")
def unet():
    return load_pretrained().unet


def _built(unet, method):
    import copy

    work = copy.deepcopy(unet)
    m = study.make_method(study.method_spec(QUICK, method, "cyberpunk", 0, 1e-3), unet, QUICK)
    m.build_optimizer(work, lr=1e-3, weight_decay=0.0, total_steps=10)
    return m, work


def test_every_control_has_a_place_in_the_where_by_how_table():
    assert set(WHERE_HOW.values()) >= {(w, h) for w in ("attention", "everywhere")
                                       for h in ("sparse", "low-rank", "dense")}


def test_the_attention_controls_train_the_attention_lora_count_on_its_modules(unet):
    import re

    sara_att, work = _built(unet, "sara_attention")
    names = {s.name for s in sara_att.optimizer.slots if s.count}
    assert names and all(re.search(ATTENTION_WEIGHT, n) for n in names)
    attention_numel = sum(p.numel() for n, p in unet.named_parameters() if re.search(ATTENTION_WEIGHT, n))
    from sara_edu.training.lora import lora_rank_matching

    sara_count = _built(unet, "sara")[0].optimizer.num_trainable
    found = lora_rank_matching(unet, sara_count)
    assert found.target_modules == ATTENTION_TARGETS
    assert sara_att.optimizer.num_trainable == pytest.approx(found.lora_parameters, rel=1e-3)
    assert found.lora_parameters < attention_numel
    full_att, work = _built(unet, "full_attention")
    trained = {n for n, p in work.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in unet.named_parameters() if re.search(ATTENTION_WEIGHT, n)}
    assert all(n.endswith(".weight") for n in trained)


def test_lora_everywhere_matches_saras_count_on_convolutions_too(unet):
    sara_count = _built(unet, "sara")[0].optimizer.num_trainable
    method, work = _built(unet, "lora_everywhere")
    assert method.target_modules == tuple(t for t in ALL_TARGETS)
    adapted = {n.split(".lora_")[0] for n, p in work.named_parameters() if p.requires_grad}
    assert any(".conv1" in n or ".conv2" in n for n in adapted)  # ResNet convolutions get adapters
    count = sum(p.numel() for p in work.parameters() if p.requires_grad)
    per_rank = count / method.rank
    assert abs(count - sara_count) <= per_rank / 2 + 1  # the closest rank


def test_full_fine_tuning_of_some_modules_refuses_a_pattern_that_matches_nothing(unet):
    import copy

    work = copy.deepcopy(unet)
    with pytest.raises(ConfigError, match="no parameter matches target_modules='nothing_here'"):
        FullFineTuning(target_modules=r"nothing_here").build_optimizer(work, lr=1e-3, weight_decay=0.0,
                                                                       total_steps=1)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(work.parameters(), unet.parameters()))


def test_a_control_trains_for_a_few_steps(unet):
    from sara_edu.training.loop import train
    from sara_edu.world.data import StyleDataset
    from sara_edu.world.model import load_pretrained as fresh

    for method in ("sara_attention", "full_attention", "lora_everywhere"):
        pipe = fresh()
        m = study.make_method(study.method_spec(QUICK, method, "cyberpunk", 0, 1e-3), pipe.unet, QUICK)
        before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        history = train(pipe, StyleDataset("cyberpunk", limit_per_digit=2), method=m, steps=2, lr=1e-3,
                        batch_size=4, progress=False)
        assert len(history) == 2 and math.isfinite(history.loss.iloc[-1])
        if method != "lora_everywhere":  # LoRA's adapter lives beside the frozen weights
            moved = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
            assert moved and all(n.endswith(".weight") and any(t in n for t in ("to_q", "to_k", "to_v", "to_out"))
                                 for n in moved)


def _rows(agreement: dict, seeds=(0, 1, 2), styles=("barbiecore", "hornify")):
    import pandas as pd

    from sara_edu.study.config import SCHEMA

    base = {c: (0 if k == "int" else math.nan if k == "float" else "") for c, k in SCHEMA.items()}
    rows = []
    for m, a in agreement.items():
        for style in styles:
            for seed in seeds:
                rows.append({**base, "run_id": f"{m}{style}{seed}", "study": "t", "phase": "main", "method": m,
                             "style": style, "seed": seed, "status": "ok", "prior": 0,
                             "agreement": a + 0.01 * seed, "fid": 100.0 - 50 * a + seed})
    return pd.DataFrame(rows, columns=list(SCHEMA))


def test_the_where_by_how_grid_and_the_one_difference_comparisons():
    from sara_edu.study.tables import controls_table, one_difference_pairs, where_how_table

    agreement = {"sara": 0.9, "sara_attention": 0.5, "lora_matched": 0.4, "lora_everywhere": 0.8, "full": 0.95,
                 "full_attention": 0.6}
    df = _rows(agreement)
    grid = where_how_table(df).splitlines()
    assert grid[0] == "| where \\ how | sparse | low-rank | dense |"
    attention = [c.strip() for c in grid[2].strip("|").split("|")]
    # agreement per seed (0.5, 0.51, 0.52) -> 0.51 ± 0.01
    assert attention[:2] == ["attention", "SaRA on attention (count-matched): 0.51 ± 0.01"]
    pairs = {(a, b): what for a, b, what in one_difference_pairs(list(agreement))}
    assert pairs[("sara", "sara_attention")] == "where (everywhere vs attention), both sparse"
    assert pairs[("sara_attention", "lora_matched")] == "how (sparse vs low-rank), both attention"
    assert ("sara", "lora_matched") not in pairs and ("lora_matched", "sara") not in pairs  # two differences
    assert len(pairs) == 3 + 2 * 3  # where: one per how; how: three per where
    table = controls_table(df)
    # SaRA − SaRA on attention: +0.4 on every pair (sd 0): better, and far beyond the 0.05 margin
    assert "| SaRA − SaRA on attention (count-matched) | where (everywhere vs attention), both sparse | 6 | " \
           in table
    line = next(l for l in table.splitlines() if l.startswith("| SaRA − SaRA on attention"))
    assert "+0.4 ± 0 ✓" in line
    # without controls (the committed study's methods) there is no such section
    assert controls_table(_rows({"sara": 0.9, "lora_matched": 0.4, "full": 0.95})) == ""


def test_the_controls_study_is_one_command_and_shares_fulls_protocol():
    from sara_edu.study.__main__ import main
    from sara_edu.study.config import CONFIGS, CONTROLS_STUDY, FULL

    assert CONFIGS["controls"] is CONTROLS_STUDY
    for field in ("steps", "batch_size", "limit_per_digit", "eval_per_digit", "eval_plain_per_digit", "eval_steps",
                  "guidance_scale", "fraction", "rank_lambda", "lr_search_pairs"):
        assert getattr(CONTROLS_STUDY, field) == getattr(FULL, field), field
    assert set(CONTROLS_STUDY.seeds) <= set(FULL.seeds) and set(CONTROLS_STUDY.methods) >= set(WHERE_HOW)
    for method in FULL.methods:  # FULL's methods keep FULL's grids, so their runs are FULL's (reused, not rerun)
        assert CONTROLS_STUDY.lrs[method] == FULL.lrs[method], method
    with pytest.raises(SystemExit):
        main(["run", "--quick", "--study", "controls"])


def test_a_control_runs_through_the_study_and_ships_only_what_it_trained():
    row = study.run_one(study.method_spec(QUICK, "full_attention", "cyberpunk", 0, 3e-4), QUICK)
    assert row["status"] == "ok" and row["method"] == "full_attention"
    # 200,704 float32 weights plus safetensors' header, not the whole 1.66M-number UNet
    assert row["trainable_params"] * 4 < row["file_size_bytes"] < row["trainable_params"] * 4 + 50_000


def test_the_budget_curve_draws_any_method_with_its_loss():
    from sara_edu.study.budget import budget_curve

    curve = budget_curve(QUICK, checkpoints=(2, 4), lr=3e-3, styles=("cyberpunk",), method="sara", progress=False)
    assert list(curve.step) == [2, 4] and set(curve.method) == {"sara"}
    assert curve.loss.notna().all() and ((curve.agreement >= 0) & (curve.agreement <= 1)).all()


def test_the_budget_table_says_which_method_had_not_saturated():
    import pandas as pd

    from sara_edu.study.tables import budget_table

    rows = [("sara", s, a, 0.1) for s, a in ((100, 0.5), (800, 0.9), (1600, 0.92))]
    rows += [("lora_matched", s, a, 0.2) for s, a in ((100, 0.1), (800, 0.4), (1600, 0.7))]
    curve = pd.DataFrame([{"method": m, "style": "hornify", "step": s, "lr": 1e-3, "agreement": a, "loss": loss}
                          for m, s, a, loss in rows])
    table = budget_table(curve, 800)
    assert "| SaRA | hornify | 0.001 | 0.50 (0.100) | 0.90 (0.100) | 0.92 (0.100) | yes (+0.02 by step 1600) |" in table
    assert "| LoRA rank-matched | hornify | 0.001 | 0.10 (0.200) | 0.40 (0.200) | 0.70 (0.200) | no (+0.30 by step 1600) |" \
        in table


def test_a_run_with_the_same_run_id_in_another_file_is_copied_not_trained(tmp_path, monkeypatch):
    from sara_edu.study.config import SCHEMA, read_results, write_results

    spec = study.method_spec(QUICK, "sara", "cyberpunk", 0, 3e-3)
    donor = read_results(tmp_path / "none.csv")
    row = {c: 0 if SCHEMA[c] == "int" else None for c in donor.columns} | {"run_id": spec.run_id(QUICK), "study": "full", "phase": "main",
                                              "method": "sara", "style": "cyberpunk", "seed": 0, "lr": 3e-3,
                                              "status": "ok", "agreement": 0.5}
    import pandas as pd

    write_results(pd.DataFrame([row], columns=donor.columns), tmp_path / "donor.csv")
    trained = []
    monkeypatch.setattr(study, "run_one",
                        lambda spec, config, model=None: trained.append(spec) or dict(row, run_id=spec.run_id(config)))
    runner = study._Runner(QUICK, tmp_path / "out.csv", None, 1, None, False, reuse=[tmp_path / "donor.csv"])
    other = study.method_spec(QUICK, "full", "cyberpunk", 0, 3e-4)
    runner.run([("main", spec), ("main", other)])
    assert trained == [other]  # only the run the donor file lacks is trained
    got = read_results(tmp_path / "out.csv").set_index("run_id").loc[spec.run_id(QUICK)]
    assert got.study == QUICK.name and got.agreement == 0.5 and got.phase == "main+reused"
    with pytest.raises(ConfigError, match="reuse"):
        study.run_study(QUICK, tmp_path / "x.csv", reuse=[tmp_path / "missing.csv"], progress=False)


def test_the_budget_curve_knows_every_methods_searched_rate():
    import argparse

    from sara_edu.study.budget import chosen_rates, main
    from sara_edu.study.config import CHOSEN_LRS, CONTROLS_CHOSEN_LRS, CONTROLS_STUDY

    rates = chosen_rates()
    assert set(rates) >= set(CONTROLS_STUDY.methods)
    assert all(rates[m] == CHOSEN_LRS.get(m, CONTROLS_CHOSEN_LRS.get(m)) for m in rates)
    with pytest.raises(SystemExit, match="no chosen learning rate for \\['lora_mlp'\\]"):
        main(argparse.Namespace(methods=["lora_mlp"], steps=[2], lr=1e-3, styles=None, out="unused.csv"))
