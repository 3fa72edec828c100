"""sara_edu.lessons.sara_vs_lora: fair fine-tuning of SaRA / LoRA / full, their costs, samples and metrics."""
import copy

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sara_edu.errors import ConfigError
from sara_edu.io import load_tensors
from sara_edu.lessons import sara_vs_lora as compare
from sara_edu.measure.memory import CATEGORIES, CATEGORY_LABELS, MB
from sara_edu.sara.attach import attached_owner
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.selection import select_parameters
from sara_edu.training.lora import LoRA, has_lora, lora_parameters_per_rank
from sara_edu.training.sara import SaRA
from sara_edu.world.data import StyleDataset
from sara_edu.world.metrics import vlhi
from sara_edu.world.model import TINY_UNET_CONFIG, TinyDiffusion, build_unet, generate
from sara_edu.world.text import TinyTextEncoder, make_prompt

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
STEPS = 4
FRACTION = 0.1


def small_pipe(seed=0):
    return TinyDiffusion(build_unet(SMALL_CONFIG, seed=seed), TinyTextEncoder(seed=0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One comparison of the three methods on a small model, shared by the tests below (a few seconds)."""
    torch.manual_seed(0)
    base = small_pipe()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    data = StyleDataset("cyberpunk", digits=[1, 3], limit_per_digit=4)
    out = tmp_path_factory.mktemp("files")
    result = compare.finetune_methods(base, "cyberpunk", steps=STEPS, lr=1e-2, batch_size=4, fraction=FRACTION,
                                      tracked_steps=2, dataset=data, out_dir=out, progress=False)
    plt.close("all")
    return base, before, result


def test_method_names_and_sizes():
    unet = build_unet(SMALL_CONFIG, seed=0)
    assert compare.canonical_method_name("sara") == "SaRA"
    assert compare.canonical_method_name(" Full ") == "full fine-tuning"
    with pytest.raises(ConfigError, match="unknown method"):
        compare.canonical_method_name("adapter")
    sara = compare.make_method("sara", unet, fraction=0.2)
    assert isinstance(sara, SaRA) and sara.fraction == 0.2
    lora = compare.make_method("LoRA", unet, fraction=FRACTION)
    budget = select_parameters(unet, fraction=FRACTION).total_selected
    per_rank = lora_parameters_per_rank(unet, lora.target_modules)
    # the rank matched to SaRA's count: no other rank comes closer
    assert abs(lora.rank * per_rank - budget) <= per_rank / 2 + 1
    assert compare.make_method("lora", unet, lora_rank=3).rank == 3


def test_the_base_model_is_left_untouched_and_every_result_is_a_plain_model(run):
    base, before, result = run
    assert list(result.runs) == list(compare.DEFAULT_METHODS)
    for k, v in base.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert attached_owner(base.unet) is None and not has_lora(base.unet)
    for name, r in result.runs.items():
        unet = r.pipe.unet
        assert r.pipe is not base and unet is not base.unet
        assert attached_owner(unet) is None and not has_lora(unet), name
        assert sorted(unet.state_dict()) == sorted(before), f"{name} is not the base architecture after merging"
        assert not any(p.requires_grad for p in unet.parameters())
        assert len(r.history) == STEPS and np.isfinite(r.history.loss).all()
    assert list(result.pipes) == [compare.REFERENCE, *compare.DEFAULT_METHODS]
    assert result.pipes[compare.REFERENCE] is base


def test_each_method_changed_what_it_should(run):
    base, before, result = run
    selection = select_parameters(base.unet, fraction=FRACTION)  # the same rule on the same weights
    sara = dict(result.runs["SaRA"].pipe.unet.named_parameters())
    changed_outside = changed = 0
    for name, p in sara.items():
        diff = (p.detach() != before[name]).reshape(-1)
        mask = torch.zeros_like(diff)
        if name in selection.indices:
            mask[selection.indices[name].long()] = True
        changed += int(diff.sum())
        changed_outside += int((diff & ~mask).sum())
    assert changed > 0 and changed_outside == 0
    full = result.runs["full fine-tuning"].pipe.unet.state_dict()
    moved = sum(int((full[k] != before[k]).sum()) for k in before if full[k].is_floating_point())
    assert moved > 0.5 * sum(v.numel() for v in before.values())
    lora = result.runs["LoRA"].pipe.unet.state_dict()
    assert any(not torch.equal(lora[k], before[k]) for k in before if "to_q" in k)  # merged ΔW landed in W
    assert all(torch.equal(lora[k], before[k]) for k in before if "conv_in" in k)  # not a LoRA target


def test_counts_and_file_sizes_against_independent_references(run):
    base, before, result = run
    total = sum(p.numel() for p in base.unet.parameters())
    selected = select_parameters(base.unet, fraction=FRACTION).total_selected
    runs = result.runs
    assert runs["full fine-tuning"].trainable == total
    assert runs["SaRA"].trainable == selected
    lora = runs["LoRA"].method
    assert runs["LoRA"].trainable == lora.rank * lora_parameters_per_rank(base.unet, lora.target_modules)
    # a safetensors file is its tensors' bytes plus a header of names/metadata
    state_bytes = sum(v.numel() * v.element_size() for v in before.values())
    full = runs["full fine-tuning"]
    assert state_bytes < full.file_bytes < state_bytes + 200_000
    tensors, _ = load_tensors(runs["SaRA"].file)
    sara_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert sara_bytes >= selected * (4 + 4)  # one fp32 value and one int32 position per trained entry
    assert runs["SaRA"].file_bytes == runs["SaRA"].file.stat().st_size < full.file_bytes
    assert runs["LoRA"].file_bytes >= 4 * runs["LoRA"].trainable
    costs = result.costs()
    assert list(costs.index) == list(compare.DEFAULT_METHODS)
    assert costs.loc["SaRA", "saved file (MB)"] == pytest.approx(runs["SaRA"].file_bytes / MB)
    assert costs.loc["full fine-tuning", "% of the UNet"] == pytest.approx(100)


def test_memory_breakdown_adds_up_and_ranks_the_methods(run):
    base, before, result = run
    frame = compare.memory_breakdown_frame(result)
    categories = [CATEGORY_LABELS[c] for c in CATEGORIES]
    np.testing.assert_allclose(frame[categories].sum(axis=1), frame["peak above frozen"], rtol=1e-9)
    model_mb = sum(v.numel() * v.element_size() for v in base.unet.parameters()) / MB
    # full fine-tuning trains every weight and keeps two AdamW moments of each
    assert frame.loc["full fine-tuning", "trainable values"] == pytest.approx(model_mb, rel=1e-6)
    assert frame.loc["full fine-tuning", "optimizer state"] >= 2 * model_mb
    assert frame.loc["SaRA", "optimizer state"] < 0.5 * frame.loc["full fine-tuning", "optimizer state"]
    assert frame.loc["SaRA", "peak above frozen"] < frame.loc["full fine-tuning", "peak above frozen"]
    assert compare.memory_breakdown_frame(result.memory).equals(frame)
    with pytest.raises(ConfigError):
        compare.memory_breakdown_frame({})


def test_figures(run):
    _, _, result = run
    fig = compare.plot_costs(result)
    assert len(fig.axes) == 6 and "MB" in fig.axes[0].get_ylabel()
    everything, own = fig.axes[:2]
    frame = compare.memory_breakdown_frame(result)
    model_mb = sum(p.numel() * p.element_size() for p in result.base.unet.parameters()) / MB
    # every bar holds the UNet's weights once: full fine-tuning's trainable values are those weights, SaRA's and
    # LoRA's frozen UNet is added to what lies above it
    in_place = frame["trainable values"].where(frame["frozen weights"] < 0.5 * model_mb, 0.0)
    totals = [float(t.get_text()) for t in everything.texts]
    np.testing.assert_allclose(totals, frame["peak above frozen"] - in_place + model_mb, atol=0.051)
    assert totals[list(frame.index).index("full fine-tuning")] == pytest.approx(
        frame.loc["full fine-tuning", "peak above frozen"], abs=0.051)
    own_totals = [float(t.get_text()) for t in own.texts]  # what the method adds: no model, no activations
    np.testing.assert_allclose(own_totals, frame["peak above frozen"] - in_place - frame["activations + transients"],
                               atol=0.051)
    with_model = compare.memory_with_the_model(result)
    assert with_model[compare.figures.MODEL_WEIGHTS].tolist() == pytest.approx([model_mb] * len(with_model))
    assert with_model.loc["full fine-tuning", compare.figures.TRAINED_EXTRA] == pytest.approx(0, abs=0.01)
    assert with_model.loc["SaRA", compare.figures.TRAINED_EXTRA] > 0  # its copies of the selected values
    assert own.get_ylim()[1] < everything.get_ylim()[1]  # on its own, readable scale
    fig2 = compare.plot_losses(result)
    assert len(fig2.axes[0].get_legend().get_texts()) == 3


def test_side_by_side_uses_the_same_noise_for_every_model(run):
    base, _, result = run
    cache = {}
    prompt = make_prompt(3, "cyberpunk")
    fig = compare.side_by_side(result, prompt, seed=5, n=2, steps=2, cache=cache)
    pipes = result.pipes
    assert len([ax for ax in fig.axes if ax.images]) == 2 * len(pipes)
    for label, pipe in pipes.items():
        images = cache[(label, prompt, 5, 2, 2, 3.0)]
        assert torch.equal(images, generate(pipe, [prompt] * 2, steps=2, seed=5))
    # the models differ, so their rows do too (the fine-tuned ones moved away from the base)
    key = (prompt, 5, 2, 2, 3.0)
    assert not torch.equal(cache[("full fine-tuning", *key)], cache[("pretrained", *key)])
    with pytest.raises(ConfigError, match="unknown method"):
        compare.side_by_side(result, prompt, methods=["DoRA"])


def test_side_by_side_view_for_the_widget(run):
    _, _, result = run
    update = compare.side_by_side_view(result, n=2, steps=2)
    one = update(digit=1, style="cyberpunk", seed=0, method="LoRA")
    assert [ax.get_ylabel() for ax in one.axes if ax.get_ylabel()] == ["pretrained", "LoRA"]
    every = update(digit=1, style="plain", seed=0, method="all")
    assert len([ax for ax in every.axes if ax.images]) == 2 * 4
    with pytest.raises(ConfigError):
        update(method="DoRA")


def test_metric_table_asks_the_three_questions_and_normalises_vlhi_over_the_fine_tuned_models():
    pipes = {"pretrained": object(), "A": object(), "B": object(), "C": object()}
    fid = {"pretrained": 90.0, "A": 10.0, "B": 30.0, "C": 20.0}
    agreement = {"pretrained": 0.0, "A": 0.5, "B": 0.9, "C": 0.7}
    label_of = {id(p): k for k, p in pipes.items()}
    calls = []

    def fake_evaluate(pipe, style, digits, n_per_digit, seed, steps, guidance_scale):
        label = label_of[id(pipe)]
        calls.append((label, style, tuple(digits), n_per_digit, steps))
        bump = {"cyberpunk": 0.0, None: 0.1}[style] + (0.01 if tuple(digits) == (7, 8, 9) else 0)
        return {"fid": fid[label] + 100 * bump, "kid": fid[label] / 1000 + bump, "gate_pass": 0.75,
                "gated_agreement": 0.5 * agreement[label], "digit_acc": 0.9, "look_acc": 0.8,
                "agreement": agreement[label] + bump}

    table = compare.metric_table(pipes, "cyberpunk", n_per_digit=3, steps=7, evaluate=fake_evaluate, progress=False)
    assert list(table.index) == list(pipes)
    assert ("A", "cyberpunk", (0, 1, 2, 3, 4, 5, 6), 3, 7) in calls
    assert ("A", None, tuple(range(10)), 3, 7) in calls
    assert ("A", "cyberpunk", (7, 8, 9), 3, 7) in calls
    assert len(calls) == 3 * len(pipes)
    assert table.loc["B", "style_agreement"] == pytest.approx(0.9)
    assert table.loc["B", "style_kid"] == pytest.approx(0.03)  # the style task's KID, beside its FID
    assert table.loc["B", "style_gated_agreement"] == pytest.approx(0.45)
    assert table.loc["B", "style_gate_pass"] == pytest.approx(0.75)
    assert table.loc["B", "plain_agreement"] == pytest.approx(1.0)
    assert table.loc["B", "unseen_agreement"] == pytest.approx(0.91)
    expected = vlhi([10.0, 30.0, 20.0], [0.5, 0.9, 0.7])  # the reference row takes no part
    np.testing.assert_allclose(table.loc[["A", "B", "C"], "vlhi"], expected)
    assert np.isnan(table.loc["pretrained", "vlhi"])
    fig = compare.plot_metric_table(table)
    assert len(fig.axes) == 4
    with pytest.raises(ConfigError, match="style"):
        compare.metric_table(pipes, None, evaluate=fake_evaluate)
    with pytest.raises(ConfigError):
        compare.metric_table({}, "cyberpunk", evaluate=fake_evaluate)


def test_summary_table_joins_costs_and_metrics(run):
    _, _, result = run
    metrics = pd.DataFrame({"style_fid": [1.0, 2.0, 3.0, 4.0], "style_agreement": [0.1, 0.2, 0.3, 0.4]},
                           index=pd.Index(["pretrained", *compare.DEFAULT_METHODS], name="method"))
    table = compare.summary_table(result, metrics)
    assert list(table.index) == list(metrics.index)
    assert table.loc["SaRA", "style_fid"] == 2.0
    assert pd.isna(table.loc["pretrained", "trainable parameters"])
    assert table.loc["SaRA", "trainable parameters"] == result.runs["SaRA"].trainable


def test_bad_input_is_refused_with_advice():
    base = small_pipe()
    data = StyleDataset("cyberpunk", digits=[1], limit_per_digit=2)
    with pytest.raises(ConfigError, match="tracked_steps"):
        compare.finetune_methods(base, "cyberpunk", steps=2, tracked_steps=2, dataset=data)
    with pytest.raises(ConfigError, match="learning rate"):
        compare.finetune_methods(base, "cyberpunk", ["sara"], steps=3, lr={"LoRA": 1e-3}, dataset=data,
                                 progress=False)
    with pytest.raises(ConfigError, match="TrainingMethod"):
        compare.finetune_methods(base, "cyberpunk", {"mine": "sara"}, steps=3, dataset=data)
    with pytest.raises(ConfigError, match="pretrained"):
        compare.finetune_methods(base, "cyberpunk", {"pretrained": SaRA()}, steps=3, dataset=data)
    attached = copy.deepcopy(base)
    optimizer = SaRAAdamW(attached.unet, fraction=0.1)
    with pytest.raises(ConfigError, match="already has SaRA"):
        compare.finetune_methods(attached, "cyberpunk", steps=3, dataset=data)
    optimizer.detach()


def test_custom_variants_and_per_method_learning_rates():
    base = small_pipe()
    data = StyleDataset("cyberpunk", digits=[1], limit_per_digit=2)
    result = compare.finetune_methods(base, "cyberpunk", {"λ = 0": SaRA(fraction=0.1, rank_lambda=0),
                                                          "LoRA r=2": LoRA(rank=2)},
                                      steps=3, lr={"λ = 0": 1e-3, "LoRA r=2": 1e-2}, batch_size=2,
                                      dataset=data, tracked_steps=1, progress=False)
    assert list(result.runs) == ["λ = 0", "LoRA r=2"]
    assert result.runs["λ = 0"].history.lr.iloc[0] < result.runs["LoRA r=2"].history.lr.iloc[0]
    assert result.runs["λ = 0"].file is None and result.runs["λ = 0"].file_bytes > 0


def test_step_times_come_from_the_fair_timing_function(run):
    """Interleaved, warm-up excluded, process CPU time, tracker off: the table and the figure show those numbers."""
    _, _, result = run
    times = result.step_times
    assert list(times.index) == list(result.runs) and (times.clock == "process CPU").all()
    assert times.ratio.iloc[0] == 1.0 and (times.seconds > 0).all()
    costs = result.costs()
    assert costs["median step time (s)"].tolist() == times.seconds.tolist()
    for name, r in result.runs.items():  # not the training runs' own wall-clock medians
        assert costs.loc[name, "median step time (s)"] != r.step_time_s
    fig = compare.plot_costs(result)
    step_panel = next(ax for ax in fig.axes if "Step time" in ax.get_title())
    drawn = [bar.get_height() for bar in step_panel.patches]
    assert drawn == pytest.approx(times.seconds.tolist())


def test_paper_claims_reads_the_committed_study_or_says_where_it_is(monkeypatch, tmp_path):
    from sara_edu.errors import DataError
    from sara_edu.lessons import sara_vs_lora
    from sara_edu.world import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)  # a wheel: no reports/
    with pytest.raises(DataError, match="reports/study.md"):
        sara_vs_lora.paper_claims()


def test_gated_samples_mark_what_the_table_counts(tiny_pipe):
    fig = compare.gated_samples({"a": tiny_pipe, "b": tiny_pipe}, "cyberpunk", digits=[1, 2, 3], steps=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and all(t.split()[0] in ("pass", "reject") and t.split()[1] in ("✓", "✗")
                                    for t in titles)
    with pytest.raises(ConfigError, match="at least one digit"):
        compare.gated_samples({"a": tiny_pipe}, "cyberpunk", digits=[])


def test_where_how_reads_the_committed_controls_or_says_where_they_are(monkeypatch, tmp_path):
    from sara_edu.errors import DataError
    from sara_edu.lessons import sara_vs_lora
    from sara_edu.world import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)  # a wheel: no reports/
    with pytest.raises(DataError, match="reports/controls.md"):
        sara_vs_lora.where_how()


def test_the_controls_are_offered_by_name_and_built_as_the_study_builds_them(tiny_pipe):
    import re

    from sara_edu.lessons import sara_vs_lora
    from sara_edu.study import run as study
    from sara_edu.study.config import FULL

    for name, key in sara_vs_lora.CONTROL_METHODS.items():
        ours = sara_vs_lora.make_method(name, tiny_pipe.unet)
        theirs = study.make_method(study.method_spec(FULL, key, "cyberpunk", 0, 1e-3), tiny_pipe.unet, FULL)
        assert type(ours) is type(theirs) and getattr(ours, "name", None) == getattr(theirs, "name", None), name
        assert sara_vs_lora.canonical_method_name(key) == name  # the study's key works too
    with pytest.raises(ConfigError, match=re.escape("SaRA on attention")):  # the error lists the controls
        sara_vs_lora.make_method("sara on mlp", tiny_pipe.unet)
