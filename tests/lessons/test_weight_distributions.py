import numpy as np
import pytest
import torch

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.io import save_tensors
from sara_edu.lessons import weight_distributions as W
from sara_edu.world.model import save_pretrained


@pytest.mark.parametrize("name, kind", [
    ("conv_in.weight", "conv"),
    ("down_blocks.0.resnets.0.conv1.weight", "conv"),
    ("up_blocks.1.resnets.0.conv_shortcut.bias", "conv"),
    ("down_blocks.1.downsamplers.0.conv.weight", "conv"),
    ("conv_norm_out.weight", "norm"),
    ("mid_block.resnets.0.norm1.bias", "norm"),
    ("down_blocks.1.attentions.0.norm.weight", "norm"),
    ("up_blocks.0.attentions.1.transformer_blocks.0.norm3.weight", "norm"),
    ("time_embedding.linear_1.weight", "time embedding"),
    ("down_blocks.0.resnets.0.time_emb_proj.weight", "time embedding"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "attention q"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "attention k"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight", "attention v"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.bias", "attention out"),
    ("down_blocks.2.attentions.0.proj_in.weight", "attention proj"),
    ("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", "feed-forward"),
    ("something.else", "other"),
])
def test_parameter_kind(name, kind):
    assert W.parameter_kind(name) == kind


def test_every_course_unet_parameter_has_a_known_kind(tiny_pipe):
    kinds = {W.parameter_kind(n) for n, _ in tiny_pipe.unet.named_parameters()}
    assert "other" not in kinds
    assert {"conv", "attention q", "attention k", "attention v", "attention out", "feed-forward", "norm",
            "time embedding"} <= kinds


def test_weight_stats_match_direct_computation(tiny_pipe):
    theta = 0.01
    table = W.weight_stats(tiny_pipe, threshold=theta, quantiles=(0.1, 0.5))
    params = dict(tiny_pipe.unet.named_parameters())
    assert list(table.name) == list(params)
    assert table.numel.sum() == sum(p.numel() for p in params.values())
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    row = table.set_index("name").loc[name]
    a = params[name].detach().abs().flatten().double().numpy()
    assert row.kind == "feed-forward" and row.block == "mid_block" and row.role == "weight"
    assert row.mean_abs == pytest.approx(a.mean(), rel=1e-9)
    assert row.q50 == pytest.approx(np.quantile(a, 0.5), rel=1e-9)
    assert row.q10 == pytest.approx(np.quantile(a, 0.1), rel=1e-9)
    assert row.frac_below == pytest.approx((a < theta).mean())
    assert row.max_abs == pytest.approx(a.max())


def test_kind_stats_group_the_per_tensor_table(tiny_pipe):
    theta = 0.02
    per_tensor = W.weight_stats(tiny_pipe, threshold=theta)
    per_kind = W.kind_stats(tiny_pipe, threshold=theta).set_index("kind")
    expected_numel = per_tensor.groupby("kind").numel.sum()
    assert per_kind.numel.to_dict() == expected_numel.to_dict()
    assert per_kind.share.sum() == pytest.approx(1.0)
    below = (per_tensor.frac_below * per_tensor.numel).groupby(per_tensor.kind).sum()
    for kind, row in per_kind.iterrows():
        assert row.frac_below == pytest.approx(below[kind] / row.numel, abs=1e-9)
    ff = torch.cat([p.detach().abs().flatten() for n, p in tiny_pipe.unet.named_parameters() if ".ff." in n])
    assert per_kind.loc["feed-forward", "median_abs"] == pytest.approx(float(ff.median()))
    assert per_kind.loc["feed-forward", "mean_abs"] == pytest.approx(float(ff.double().mean()))


def test_threshold_from_values_counts_exactly():
    values = torch.arange(1, 11, dtype=torch.float32) / 10  # 0.1 .. 1.0
    for fraction, k in [(0.0, 0), (0.3, 3), (0.55, 6), (1.0, 10)]:
        theta = W.threshold_from_values(values, fraction)
        assert int((values < theta).sum()) == k
    with pytest.raises(ConfigError):
        W.threshold_from_values(values, 1.5)


def _crafted():
    small = torch.linspace(0.001, 0.01, 100)    # all tiny
    large = torch.linspace(1.0, 2.0, 100)       # all big
    mixed = torch.tensor([0.5, 0.0005, 3.0, 0.002]).view(2, 2)
    return {"a.small.weight": small, "b.large.weight": large, "c.mixed.weight": mixed}


def test_global_vs_per_layer_on_crafted_weights():
    table = W.global_vs_per_layer(_crafted(), fraction=0.5).set_index("name")
    # 204 values, the 102 smallest: all 100 tiny ones plus 0.0005 and 0.002 from "mixed"
    assert table.loc["a.small.weight", "global_fraction"] == 1.0
    assert table.loc["b.large.weight", "global_fraction"] == 0.0
    assert table.loc["c.mixed.weight", "global_fraction"] == 0.5
    assert (table.per_layer_fraction == 0.5).all()
    assert table.loc["b.large.weight", "per_layer_threshold"] == pytest.approx(float(torch.linspace(1, 2, 100)[50]))
    assert table.global_threshold.nunique() == 1


def test_smallest_mask_sizes_and_ties():
    weights = {"x.weight": torch.ones(10), "y.weight": torch.full((3, 4), 0.5)}  # every value ties
    glob = W.smallest_mask(weights, 0.25)
    assert sum(int(m.sum()) for m in glob.values()) == round(0.25 * 22)
    assert glob["y.weight"].shape == (3, 4) and int(glob["x.weight"].sum()) == 0  # 0.5 < 1 goes first
    per = W.smallest_mask(weights, 0.5, scope="per_layer")
    assert int(per["x.weight"].sum()) == 5 and int(per["y.weight"].sum()) == 6
    with pytest.raises(ConfigError):
        W.smallest_mask(weights, 0.5, scope="everywhere")


def test_mask_overlap_on_crafted_sets():
    a = {"w": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)}
    b = {"w": torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)}
    o = W.mask_overlap(a, b)
    assert o["intersection"] == 2 and o["size_a"] == 4 and o["size_b"] == 4
    assert o["jaccard"] == pytest.approx(2 / 6) and o["retained"] == pytest.approx(0.5)
    assert W.mask_overlap(a, a)["jaccard"] == 1.0
    with pytest.raises(ConfigError):
        W.mask_overlap(a, {"v": b["w"]})


def test_smallest_set_stability_on_crafted_snapshots():
    ranks = torch.arange(1, 101, dtype=torch.float32).view(10, 10)
    same = W.Snapshot("same", 10, 0.1, {"w.weight": ranks.clone()})
    reversed_ = W.Snapshot("reversed", 20, 0.2, {"w.weight": ranks.flip(0).flip(1)})
    shuffled = W.Snapshot("half", 30, 0.3, {"w.weight": torch.cat([ranks.flatten()[:5], ranks.flatten()[50:55],
                                                                    ranks.flatten()[5:50], ranks.flatten()[55:]]).view(10, 10)})
    final = W.Snapshot("final", 100, 1.0, {"w.weight": ranks})
    table = W.smallest_set_stability([same, reversed_, shuffled, final], fraction=0.1).set_index("name")
    assert table.loc["same", "retained"] == 1.0 and table.loc["final", "jaccard"] == 1.0
    assert table.loc["reversed", "retained"] == 0.0
    assert table.loc["half", "retained"] == pytest.approx(0.5)
    assert table.loc["half", "jaccard"] == pytest.approx(5 / 15)
    assert (table.chance == 0.1).all()
    assert list(table.columns) == ["step", "progress", "retained", "jaccard", "chance"]


def test_pretraining_snapshots_read_checkpoints_in_order(tmp_path, tiny_pipe):
    folder = tmp_path / "model"
    save_pretrained(tiny_pipe, folder, {"recipe": {"steps": 200}})
    state = tiny_pipe.unet.state_dict()
    for step, scale in ((10, 0.5), (100, 2.0)):
        save_tensors({k: (v * scale).half() for k, v in state.items()}, folder / "checkpoints" / f"step_{step:06d}.safetensors")
    snaps = W.pretraining_snapshots(folder)
    assert [s.name for s in snaps] == ["step_000010", "step_000100", "final"]
    assert [s.progress for s in snaps] == [0.05, 0.5, 1.0]
    name = "conv_in.weight"
    assert torch.allclose(snaps[1].weights[name], (state[name] * 2).half().float())
    with pytest.raises(CheckpointError):
        W.pretraining_snapshots(tmp_path / "nothing")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="fraction"):
        W.global_vs_per_layer(_crafted(), fraction=10)
    with pytest.raises(ConfigError, match="nn.Module"):
        W.weight_stats([1, 2, 3])
    with pytest.raises(ConfigError, match="by must be"):
        W.abs_values_frame(_crafted(), by="colour")


def test_per_layer_merges_weight_and_bias_in_forward_order():
    import pandas as pd

    table = pd.DataFrame({
        "name": ["up_blocks.0.x.weight", "up_blocks.0.x.bias", "mid_block.y.weight", "conv_in.weight"],
        "layer": ["up_blocks.0.x", "up_blocks.0.x", "mid_block.y", "conv_in"],
        "block": ["up_blocks.0", "up_blocks.0", "mid_block", "conv_in"],
        "kind": ["conv", "conv", "norm", "conv"], "numel": [30, 10, 5, 2], "f": [0.0, 1.0, 0.2, 0.5]})
    layers = W.per_layer(table, ["f"])
    assert list(layers.layer) == ["conv_in", "mid_block.y", "up_blocks.0.x"]  # down -> mid -> up
    assert layers.set_index("layer").loc["up_blocks.0.x", "f"] == pytest.approx(10 / 40)
    assert layers.set_index("layer").loc["up_blocks.0.x", "numel"] == 40


def test_figures_draw_headless(tiny_pipe):
    fig = W.plot_abs_histograms(tiny_pipe, thresholds={"θ": 1e-2}, max_per_group=2000)
    assert fig.axes[0].get_xscale() == "log" and "|w|" in fig.axes[0].get_xlabel()
    name = "conv_in.weight"
    fig = W.plot_abs_histograms(tiny_pipe, by="layer", layers=[name])
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == name
    fig = W.plot_global_vs_per_layer(tiny_pipe, 0.1)
    assert len(fig.axes) == 2
    snaps = [W.Snapshot("a", 1, 0.5, W.named_weights(tiny_pipe)), W.Snapshot("final", 2, 1.0, W.named_weights(tiny_pipe))]
    fig = W.plot_stability(snaps, 0.1)
    assert "%" in fig.axes[0].get_xlabel()
    assert len(fig.axes) == 2 and "percentile" in fig.axes[1].get_xlabel()
    fig = W.plot_layer_histogram(tiny_pipe, "conv_in.weight", 0.2)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].get_legend().get_texts()) == 2
    with pytest.raises(ConfigError):
        W.plot_layer_histogram(tiny_pipe, "no.such.weight")


def test_final_percentiles_on_crafted_snapshots():
    ranks = torch.arange(1, 101, dtype=torch.float32)
    early = W.Snapshot("early", 1, 0.1, {"w": ranks.flip(0)})  # smallest early = largest at the end
    final = W.Snapshot("final", 10, 1.0, {"w": ranks})
    pct = W.final_percentiles(early, final, 0.1)
    assert sorted(pct.tolist()) == pytest.approx([90.0 + i for i in range(10)])
    assert W.final_percentiles(final, final, 0.1).max() < 10


def test_global_threshold_without_concatenation_matches_a_full_sort(tiny_pipe):
    values = torch.sort(torch.cat([p.detach().abs().flatten() for p in tiny_pipe.unet.parameters()])).values
    n = values.numel()
    for fraction in (0.0, 0.013, 0.1, 0.5, 0.999):
        theta = W.global_threshold(tiny_pipe, fraction)
        assert theta == float(values[round(fraction * n)])
    assert W.global_thresholds(tiny_pipe, [1.0, 0.1]) == [float("inf"), W.global_threshold(tiny_pipe, 0.1)]


def _line_points_under_legend(ax) -> int:
    """How many points of the axes' lines (each segment sampled finely) the legend box covers, in pixels."""
    import numpy as np

    ax.figure.canvas.draw()
    box = ax.get_legend().get_window_extent()
    hits = 0
    for line in ax.get_lines():
        xy = ax.transData.transform(np.column_stack(line.get_data()))
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            t = np.linspace(0, 1, 50)
            hits += int(sum(box.contains(x, y) for x, y in zip(x0 + t * (x1 - x0), y0 + t * (y1 - y0))))
    return hits


def test_the_stability_legend_covers_no_line_on_the_shipped_pretraining_checkpoints():
    """Notebook 01's figure, on its own data: the legend once sat on the chance line."""
    fig = W.plot_stability(W.pretraining_snapshots(), 0.1)
    assert _line_points_under_legend(fig.axes[0]) == 0
