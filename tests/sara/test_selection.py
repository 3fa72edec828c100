import math

import pytest
import torch
from torch import nn

from sara_edu.errors import ConfigError
from sara_edu.sara.selection import (
    abs_order_statistics,
    abs_quantile,
    considered_parameters,
    select_parameters,
)
from sara_edu.world.model import build_unet


@pytest.fixture(scope="module")
def unet():
    return build_unet(seed=0)


def _all_abs(params):
    return torch.cat([p.detach().reshape(-1).abs() for p in params])


def test_threshold_selects_exactly_the_small_entries(unet):
    sel = select_parameters(unet, threshold=2e-3)
    for name, p in unet.named_parameters():
        expected = torch.nonzero(p.detach().reshape(-1).abs() < 2e-3).view(-1)
        assert torch.equal(sel.indices[name].long(), expected), name
        assert sel.indices[name].dtype == torch.int32  # compact storage
    report = sel.report()
    total = report.iloc[-1]
    assert total["name"] == "TOTAL"
    assert total.selected == sum((p.detach().abs() < 2e-3).sum().item() for p in unet.parameters())
    assert total.numel == sum(p.numel() for p in unet.parameters())
    assert list(report.columns) == ["name", "shape", "numel", "selected", "fraction", "threshold"]
    assert (report.threshold == 2e-3).all()


@pytest.mark.parametrize("q", [0.05, 0.1, 0.2, 0.5])
def test_global_fraction_matches_torch_quantile(unet, q):
    params = list(unet.parameters())
    theta = torch.quantile(_all_abs(params), q).item()
    sel = select_parameters(unet, fraction=q)
    assert sel.report().iloc[-1].threshold == theta
    assert set(sel.thresholds.values()) == {theta}
    n_expected = int((_all_abs(params) < theta).sum())
    assert sel.total_selected == n_expected
    assert sel.fraction == pytest.approx(q, abs=1e-4)


def test_per_layer_fraction_matches_torch_quantile_per_tensor(unet):
    sel = select_parameters(unet, fraction=0.1, per_layer=True)
    for name, p in unet.named_parameters():
        theta = torch.quantile(p.detach().abs().reshape(-1), 0.1).item()
        assert sel.thresholds[name] == theta, name
        assert sel.indices[name].numel() == int((p.detach().abs() < theta).sum())


def test_order_statistics_beyond_torch_quantile_limit():
    """torch.quantile refuses > 2**24 elements; the radix select does not need to concatenate."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2**23 + 11, generator=g), torch.randn(2**23, generator=g) * 3, torch.randn(17, generator=g)]
    n = sum(t.numel() for t in parts)
    assert n > 2**24
    flat = torch.cat(parts).abs()
    for k in (0, 12345, n // 2, n - 1):
        assert abs_order_statistics(parts, [k])[0] == flat.kthvalue(k + 1).values.item()
    q = abs_quantile(parts, 0.1)
    lo = flat.kthvalue(int(0.1 * (n - 1)) + 1).values.item()
    hi = flat.kthvalue(int(0.1 * (n - 1)) + 2).values.item()
    assert lo <= q <= hi


def test_filters_by_name_pattern_and_layer_type(unet):
    names = [n for n, _ in considered_parameters(unet, target_modules=["attn", "ff"])]
    assert names and all(("attn" in n or "ff" in n) for n in names)
    regex = [n for n, _ in considered_parameters(unet, target_modules=r"attn\d\.to_[qkv]\.weight$")]
    assert regex and all(n.endswith(("to_q.weight", "to_k.weight", "to_v.weight")) for n in regex)
    lin = considered_parameters(unet, layer_types=nn.Linear)
    owners = {f"{m}.{p}" if m else p for m, mod in unet.named_modules() if isinstance(mod, nn.Linear)
              for p, _ in mod.named_parameters(recurse=False)}
    assert {n for n, _ in lin} == owners
    sel = select_parameters(unet, fraction=0.2, target_modules="attn", layer_types=(nn.Linear,))
    assert set(sel.names) == {n for n, _ in considered_parameters(unet, "attn", nn.Linear)}


@pytest.mark.parametrize("kwargs, msg", [
    ({"threshold": 0.0}, "positive"), ({"threshold": -1e-3}, "positive"), ({"threshold": math.nan}, "positive"),
    ({"fraction": 0.0}, "between 0 and 1"), ({"fraction": 1.0}, "between 0 and 1"), ({"fraction": 1.5}, "between"),
    ({"threshold": 1e-3, "fraction": 0.1}, "not both"), ({}, "threshold"),
    ({"threshold": 1e-3, "per_layer": True}, "per_layer"),
    ({"fraction": 0.1, "target_modules": "no_such_layer"}, "no parameter matches"),
    ({"fraction": 0.1, "target_modules": "("}, "regular expression"),
])
def test_bad_selection_arguments(unet, kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        select_parameters(unet, **kwargs)


def test_a_threshold_that_selects_nothing_suggests_a_value(unet):
    q10 = torch.quantile(unet.conv_in.weight.detach().abs().reshape(-1), 0.1).item()
    with pytest.raises(ConfigError, match="selects no weight") as e:
        select_parameters(unet, threshold=1e-30, target_modules=r"^conv_in\.weight$")
    assert f"10% quantile of |w| is {q10:.3g}" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_order_statistics_of_other_dtypes(dtype):
    t = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    flat = t.float().abs()
    for k in (0, 499, 2500, 4999):
        assert abs_order_statistics([t], [k])[0] == flat.kthvalue(k + 1).values.item()
