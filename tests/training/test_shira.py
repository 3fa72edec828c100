import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.training.shira import (
    SHiRA,
    linear_layer_names,
    shira_parameters_per_rank,
    shira_rank_matching,
)
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)


def test_shira_trains_r_times_in_plus_out_entries_beside_frozen_weights():
    unet = build_unet(SMALL_CONFIG, seed=0)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    layers = linear_layer_names(unet)
    per_rank = shira_parameters_per_rank(unet, layers)
    r = shira_rank_matching(unet, 3 * per_rank + 10)
    assert r == 3
    method = SHiRA(r=r)
    opt = method.build_optimizer(unet, lr=1e-2, weight_decay=0.0, total_steps=2)
    assert method.trainable_parameters(unet) == 3 * per_rank
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        n for n, _ in unet.named_parameters() if "shira_" in n}
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 4, 32, generator=g)
    before = unet(x, t, c).sample.detach()
    for _ in range(2):
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = unet(x, t, c).sample.detach()
    assert not torch.equal(before, after)  # the adapters changed the output ...
    own = dict(unet.named_parameters())
    for name, w in base.items():  # ... while every base weight stayed as it was
        key = name if name in own else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(own[key], w), name


def test_shira_rank_matching_and_bad_rank():
    unet = build_unet(SMALL_CONFIG, seed=0)
    with pytest.raises(ConfigError, match="needs more entries than"):
        shira_rank_matching(unet, 10**9)
    with pytest.raises(ConfigError, match="positive integer"):
        SHiRA(r=0).build_optimizer(unet, lr=1e-3, weight_decay=0.0, total_steps=1)
