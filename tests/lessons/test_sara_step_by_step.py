"""sara_edu.lessons.sara_step_by_step: the looks inside a SaRA run used by notebook 03."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.lessons import sara_step_by_step as lessons
from sara_edu.sara.attach import detach
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)


def _orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_spectrum_of_a_known_rank_two_update():
    u, v = _orthonormal(12, 2, 0), _orthonormal(9, 2, 1)
    delta = 3.0 * torch.outer(u[:, 0], v[:, 0]) + 1.0 * torch.outer(u[:, 1], v[:, 1])
    before = {"w": torch.randn(12, 9, dtype=torch.float64), "b": torch.zeros(12)}
    after = {"w": before["w"] + delta, "b": torch.ones(12)}
    sigma = lessons.update_spectrum(before, after, "w")
    np.testing.assert_allclose(sigma[:2], [3.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(sigma[2:], 0, atol=1e-10)
    np.testing.assert_allclose(sigma, np.linalg.svd(delta.numpy(), compute_uv=False), atol=1e-10)
    assert lessons.rank_for_energy(sigma, 0.9) == 1  # 9 of 10 units of energy in the first
    assert lessons.rank_for_energy(sigma, 0.95) == 2
    assert lessons.rank_for_energy(np.zeros(4)) == 0
    with pytest.raises(ConfigError, match="vector"):
        lessons.update_spectrum(before, after, "b")
    with pytest.raises(ConfigError, match="no weight"):
        lessons.update_spectrum(before, after, "nope")


def test_conv_kernels_become_out_by_in_times_k_times_k():
    before = {"conv": torch.zeros(4, 3, 3, 3)}
    after = {"conv": torch.ones(4, 3, 3, 3)}
    delta = lessons.weight_update(before, after, "conv")
    assert delta.shape == (4, 27)
    # all-ones 4x27 has rank one with σ = sqrt(4·27)
    np.testing.assert_allclose(lessons.update_spectrum(before, after, "conv"), [np.sqrt(108), 0, 0, 0], atol=1e-9)


def test_spectrum_table_measures_low_rankness_and_skips_unchanged_weights():
    rng = torch.Generator().manual_seed(0)
    before = {"a": torch.randn(10, 8, generator=rng), "b": torch.randn(6, 6, generator=rng),
              "c": torch.randn(5, 5, generator=rng)}
    rank_one = {**before, "a": before["a"] + torch.outer(torch.ones(10), torch.arange(8.0))}
    full_rank = {**before, "a": before["a"] + torch.eye(10, 8), "b": before["b"] + 2 * torch.eye(6)}
    table = lessons.spectrum_table(before, {"low": rank_one, "high": full_rank}, names=["a", "b", "c"])
    assert set(zip(table.run, table.name)) == {("low", "a"), ("high", "a"), ("high", "b")}
    row = table.set_index(["run", "name"])
    assert row.loc[("low", "a"), "nuclear_over_frobenius"] == pytest.approx(1.0)
    assert row.loc[("low", "a"), "rank_90"] == 1
    # identity-like: 8 equal singular values -> ratio sqrt(8), all needed for 90% energy
    assert row.loc[("high", "a"), "nuclear_over_frobenius"] == pytest.approx(np.sqrt(8))
    assert row.loc[("high", "a"), "rank_90"] == 8 and row.loc[("high", "a"), "full_rank"] == 8
    assert row.loc[("high", "b"), "nuclear_norm"] == pytest.approx(12.0)
    fig = lessons.plot_update_spectra(before, {"low": rank_one, "high": full_rank})
    assert len(fig.axes) == 2
    with pytest.raises(ConfigError):
        lessons.spectrum_table(before, {})
    with pytest.raises(ConfigError, match="train first"):
        lessons.plot_update_spectra(before, {"same": before})


def test_matrix_weights_are_the_2d_ones():
    unet = build_unet(SMALL_CONFIG, seed=0)
    names = lessons.matrix_weights(unet)
    params = dict(unet.named_parameters())
    assert names and all(params[n].ndim == 2 for n in names)
    assert len(names) == sum(1 for p in params.values() if p.ndim == 2 and min(p.shape) >= 2)


def test_churn_by_kind_sums_per_kind():
    churn = pd.DataFrame({"name": ["a.to_q.weight", "b.to_q.weight", "c.conv1.weight", "TOTAL"],
                          "selected": [10, 30, 20, 60], "froze": [5, 5, 0, 10], "continue": [5, 25, 20, 50]})
    table = lessons.churn_by_kind(churn)
    assert table.loc["attention q", "selected"] == 40 and table.loc["attention q", "froze"] == 10
    assert table.loc["conv", "% froze"] == 0
    assert table.loc["TOTAL", "froze"] == 10 and table.loc["TOTAL", "% froze"] == pytest.approx(100 * 10 / 60)
    with pytest.raises(ConfigError, match="progressive"):
        lessons.churn_by_kind(None)


def _train(unet, opt, steps):
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, c = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
        unet(x, torch.tensor([10, 500]), c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_progressive_summary_against_a_direct_count():
    unet = build_unet(SMALL_CONFIG, seed=0)
    base = copy.deepcopy(unet)
    opt = SaRAAdamW(unet, lr=3e-2, fraction=0.1, rank_lambda=0, progressive_iter=2, total_steps=4)
    check = lessons.plain_model_check(unet)
    assert check["SaRA optimizer attached"] and check["gradient hooks on weights"] > 0
    _train(unet, opt, 4)
    summary = lessons.progressive_summary(base, {"run": opt})
    churn = opt.churn.set_index("name").loc["TOTAL"]
    row = summary.loc["run"]
    assert row["selected"] == opt.selection.total_selected == churn["selected"]
    assert row["froze"] == churn["froze"] > 0  # lr 3e-2 pushes many entries past θ by step 2
    assert row["continued"] == churn["continue"] == row["trainable at the end"] == opt.num_trainable
    # independent count: every entry of the selection, |w| now vs its θ
    params, base_params = dict(unet.named_parameters()), dict(base.named_parameters())
    above = moved = n = 0
    for name, idx in opt.selection.indices.items():
        now = params[name].detach().reshape(-1)[idx.long()]
        above += int((now.abs() >= opt.selection.thresholds[name]).sum())
        moved += float((now.double() - base_params[name].detach().reshape(-1)[idx.long()].double()).abs().sum())
        n += idx.numel()
    assert row["% ended ≥ θ"] == pytest.approx(100 * above / n)
    assert row["mean |Δw|"] == pytest.approx(moved / n)
    fig = lessons.plot_progressive({"run": opt})
    assert "θ" in fig.axes[0].get_xlabel()
    detach(opt)
    check = lessons.plain_model_check(unet)
    assert not check["SaRA optimizer attached"] and check["gradient hooks on weights"] == 0
    assert not check["SaRA mark on the module"] and not check["LoRA layers"]
    with pytest.raises(ConfigError, match="SaRA"):
        lessons.progressive_summary(base, {"x": object()})


def test_file_size_table(tmp_path):
    (tmp_path / "small.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "big.bin").write_bytes(b"x" * 4 * 2**20)
    table = lessons.file_size_table({"small": tmp_path / "small.bin", "big": tmp_path / "big.bin"})
    assert table.loc["small", "MB"] == pytest.approx(1.0) and table.loc["big", "MB"] == pytest.approx(4.0)
    assert table.loc["small", "% of the largest"] == pytest.approx(25.0)
    with pytest.raises(ConfigError, match="does not exist"):
        lessons.file_size_table({"missing": tmp_path / "nope.bin"})


def test_mask_figure_and_max_difference():
    unet = build_unet(SMALL_CONFIG, seed=0)
    fig = lessons.mask_figure(unet, 0.2)
    assert "20%" in fig.axes[0].get_title()
    with pytest.raises(ConfigError):
        lessons.mask_figure(unet, 1.5)
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1, 2, 3, 3] = -0.25
    assert lessons.max_difference(a, a) == 0.0 and lessons.max_difference(a, b) == 0.25
    with pytest.raises(ConfigError):
        lessons.max_difference(a, b[:1])


def test_fixed_batches_feed_two_models_the_same_data_and_the_difference_is_measured(tiny_pipe):
    import copy

    from sara_edu.world.data import StyleDataset

    data = StyleDataset("cyberpunk", digits=[1, 2], limit_per_digit=3)
    a, b = lessons.fixed_batches(tiny_pipe, data, 2, batch_size=4), lessons.fixed_batches(tiny_pipe, data, 2, batch_size=4)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    other = copy.deepcopy(tiny_pipe.unet)
    assert lessons.max_weight_difference(tiny_pipe.unet, other) == 0.0
    loss = lessons.denoising_loss(other, a[0])
    loss.backward()
    with torch.no_grad():
        other.conv_in.weight.add_(0.25)
    assert lessons.max_weight_difference(tiny_pipe.unet, other) == pytest.approx(0.25)
    assert float(loss.detach()) > 0 and other.conv_in.weight.grad is not None
    with pytest.raises(ConfigError, match="steps"):
        lessons.fixed_batches(tiny_pipe, data, 0)


def test_state_bytes_table_shows_what_each_option_keeps_and_changes(tiny_pipe):
    from sara_edu.world.data import StyleDataset

    data = StyleDataset(None, digits=[0, 1], limit_per_digit=2)
    options = {"exact": {}, "compact": {"compact": True}, "compact 8-bit": {"compact": True, "moments": "8bit"}}
    table = lessons.state_bytes_table(tiny_pipe, data, options=options, fraction=0.1, steps=2, lr=1e-3,
                                      batch_size=2)
    assert list(table.index) == list(options)
    parts = table[["values", "positions", "moments", "initial"]].sum(axis=1)
    np.testing.assert_allclose(parts, table.total)
    assert 16 <= table.total["exact"] < 22  # 16 bytes + the nuclear-norm term's starting values of 2-D weights
    assert table["values"]["exact"] == pytest.approx(4, abs=0.01) and table["values"]["compact"] < 0.01
    assert table.positions["compact"] < 1.25 < 4 <= table.positions["exact"]
    assert table.total["compact 8-bit"] < table.total["compact"] <= 8
    assert table["update vs first (%)"]["exact"] == 0
    assert 0 < table["update vs first (%)"]["compact"] < table["update vs first (%)"]["compact 8-bit"] < 20
    assert lessons.plot_state_bytes(table) is not None
    with pytest.raises(ConfigError, match="options"):
        lessons.state_bytes_table(tiny_pipe, data, options={})


def test_the_unsaid_choices_sentences_quote_their_measurements():
    """Notebook 03's 'Choices the paper leaves open': the θ-scope and weight-decay numbers are what the code gives."""
    import json
    import re

    import sara_edu
    from sara_edu.lessons import sara_step_by_step as lesson
    from sara_edu.world.paths import REPO_ROOT

    nb = json.loads((REPO_ROOT / "notebooks" / "solutions" / "03_sara_step_by_step.ipynb").read_text())
    text = next("".join(c["source"]) for c in nb["cells"] if "Choices the paper leaves open" in "".join(c["source"]))
    text = re.sub(r"\s+", " ", text)
    scope = lesson.theta_scope(sara_edu.load_pretrained().unet, 0.1)
    assert scope["norm_share"] == 0 and "no normalisation weight lies below θ" in text
    assert f"biases are {scope['bias_share']:.1%} of the selected entries" in text
    def short(x, digits):  # 5.39e-03 -> 5.39e-3, as the prose writes it
        return f"{x:.{digits}e}".replace("e-0", "e-")

    assert f"alone would be {short(scope['theta_weights_only'], 2)} instead of {short(scope['theta'], 2)}" in text
    shrink = 1 - (1 - 1e-3 * 1e-2) ** 800
    assert f"= {shrink:.1%} (less" in text and f"at most {short(scope['theta'] * shrink, 0)}" in text
