"""Selection on unusual models: non-finite weights, all-zero models and all-zero layers."""
import pytest
import torch
from torch import nn

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.sara.selection import select_parameters


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))


@pytest.mark.parametrize("value,counts", [(float("nan"), "3 NaN and 0 infinite"), (float("inf"), "0 NaN and 3 infinite"),
                                          (-float("inf"), "0 NaN and 3 infinite")])
@pytest.mark.parametrize("kwargs", [{"threshold": 0.05}, {"fraction": 0.1}, {"fraction": 0.1, "per_layer": True}])
def test_non_finite_weights_are_named_not_silently_skipped(value, counts, kwargs):
    model = _model()
    with torch.no_grad():
        model[1].weight.view(-1)[:3] = value
    with pytest.raises(CheckpointError, match=rf"not finite: 1\.weight has {counts} values among 64\..*reload"):
        select_parameters(model, **kwargs)


def test_every_non_finite_parameter_is_counted():
    model = _model()
    with torch.no_grad():
        model[0].bias[0] = float("nan")
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"0\.bias has 1 NaN.*; 1\.weight has 0 NaN and 1 infinite"):
        select_parameters(model, fraction=0.1)


@pytest.mark.parametrize("per_layer", [False, True])
def test_an_all_zero_model_is_told_what_is_wrong(per_layer):
    model = _model()
    for p in model.parameters():
        p.data.zero_()
    with pytest.raises(ConfigError, match=r"all 212 considered weights are exactly 0.*untrained or zeroed.*threshold=1e-8")\
            as e:
        select_parameters(model, fraction=0.1, per_layer=per_layer)
    assert "threshold=0 " not in str(e.value) and "threshold=0," not in str(e.value)
    # and the suggested setting is accepted and trains every entry
    assert select_parameters(model, threshold=1e-8).total_selected == 212


def test_zeros_that_tie_at_theta_suggest_a_threshold_that_selects_exactly_them():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[: p.numel() // 2] = 0  # half of every parameter is exactly 0 (like a pruned model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    with pytest.raises(ConfigError, match=r"exactly 0, so θ = 0.*threshold=(\S+) \(below every non-zero") as e:
        select_parameters(model, fraction=0.3)
    suggested = float(str(e.value).split("threshold=")[1].split(" ")[0])
    assert select_parameters(model, threshold=suggested).total_selected == zeros


def test_per_layer_rule_for_an_all_zero_layer_selects_nothing_there_and_says_so():
    model = _model()
    model[0].bias.data.zero_()
    sel = select_parameters(model, fraction=0.25, per_layer=True)
    assert sel.extra["zero_threshold_layers"] == ["0.bias"]
    assert sel.thresholds["0.bias"] == 0 and sel.indices["0.bias"].numel() == 0
    for name in ("0.weight", "1.weight", "1.bias"):  # the other layers still get their quarter
        n = sel.shapes[name][0] * (sel.shapes[name][1] if len(sel.shapes[name]) > 1 else 1)
        assert sel.indices[name].numel() == pytest.approx(0.25 * n, abs=1)
    # a threshold trains the zeros of that layer, as documented
    assert select_parameters(model, threshold=1e-2).indices["0.bias"].numel() == 16


def test_a_threshold_that_selects_only_all_zero_parameters_is_refused_with_the_numbers():
    model = _model()
    with torch.no_grad():
        model[0].bias.zero_()  # like the zero-initialised biases of norm layers
        model[1].bias.zero_()
    smallest = min(float(p.abs()[p != 0].min()) for p in model.parameters() if bool(p.any()))
    with pytest.raises(ConfigError, match=r"threshold=1e-30 selects nothing useful to train: its 20 entries are whole "
                                          r"parameters that are exactly 0 \(0\.bias, 1\.bias; 2 tensors.*θ = 1e-30 "
                                          rf"\(the smallest non-zero \|w\| is {smallest:.3g}\).*threshold=\S+ "
                                          r"\(the 10% quantile of \|w\|\), or fraction=0.1"):
        select_parameters(model, threshold=1e-30)
    # a θ that also reaches small non-zero weights is SaRA again; so is training the scattered zeros of a
    # pruned weight (they live inside a weight with non-zero entries)
    assert select_parameters(model, threshold=smallest * 1.01).total_selected == 21
    with torch.no_grad():
        model[1].weight.view(-1)[:5] = 0
    assert select_parameters(model, threshold=1e-30).total_selected == 25
