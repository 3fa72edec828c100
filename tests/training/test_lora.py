import pytest
import torch
from torch import nn

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.io import load_tensors
from sara_edu.sara.attach import detach
from sara_edu.training.loop import train
from sara_edu.training.lora import (
    ATTENTION_TARGETS,
    LoRA,
    has_lora,
    load_lora,
    lora_parameters_per_rank,
    lora_rank_matching,
    max_useful_rank,
    merge_lora,
    save_lora,
)
from sara_edu.training.sara import SaRA
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

# The course UNet, by hand: cross-attention transformer blocks of width 64 (text dim 32) in
# down blocks 1, 2 (1 layer each), up blocks 0, 1 (2 layers each) and the mid block: 7 blocks.
N_BLOCKS, D, TEXT = 7, 64, 32
# per rank: self-attention q, k, v, out are 64->64; cross-attention q, out 64->64, k, v 32->64
PER_RANK_ATTENTION = N_BLOCKS * (4 * (D + D) + 2 * (D + D) + 2 * (TEXT + D))


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = TINY_UNET_CONFIG["sample_size"]
    return (torch.randn(batch, 3, s, s, generator=g), torch.tensor([10, 500]),
            torch.randn(batch, 5, TEXT, generator=g))


def _attach(unet, method=None):
    method = method or LoRA(rank=4)
    return method, method.build_optimizer(unet, lr=1e-3, weight_decay=0.0, total_steps=10)


def _randomize_lora(unet, seed=1):
    """B starts at zero (the adapter is a no-op); give it values so round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _out(unet):
    with torch.no_grad():
        return unet(*_inputs()).sample


def test_adapter_goes_only_on_the_targets_and_only_it_trains():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = build_unet(seed=0)
    method, opt = _attach(unet)
    wrapped = {n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert len(wrapped) == N_BLOCKS * 8
    assert all(n.endswith(tuple(ATTENTION_TARGETS)) for n in wrapped)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in unet.parameters() if p.requires_grad}


def test_trainable_count_matches_the_formula():
    unet = build_unet(seed=0)
    assert lora_parameters_per_rank(unet) == PER_RANK_ATTENTION
    method, _ = _attach(unet, LoRA(rank=3))
    assert method.trainable_parameters(unet) == 3 * PER_RANK_ATTENTION
    # Conv2d(in, out, 3x3): A is a 3x3 conv in -> r, B a 1x1 conv r -> out
    unet = build_unet(seed=0)
    convs = [m for n, m in unet.named_modules() if n.endswith("conv1")]
    expected = 2 * sum(m.in_channels * 9 + m.out_channels for m in convs)
    method, _ = _attach(unet, LoRA(rank=2, target_modules=("conv1",)))
    assert method.trainable_parameters(unet) == expected


def test_rank_matching():
    unet = build_unet(seed=0)
    match = lora_rank_matching(unet, 25 * PER_RANK_ATTENTION + 100)
    assert match.rank == 25 and not match.widened and match.lora_parameters == 25 * PER_RANK_ATTENTION
    assert lora_rank_matching(unet, 10).rank == 1
    # the attention layers are at most rank 32 (text dim): a count needing more widens the targets
    assert max_useful_rank(unet) == TEXT
    n = 40 * PER_RANK_ATTENTION
    wide = lora_rank_matching(unet, n)
    assert wide.widened and set(ATTENTION_TARGETS) < set(wide.target_modules) and "proj_in" in wide.target_modules
    assert wide.rank <= max_useful_rank(unet, wide.target_modules)
    per_rank = lora_parameters_per_rank(unet, wide.target_modules)
    assert abs(wide.lora_parameters - n) <= per_rank / 2
    method = LoRA.matched_to(build_unet(seed=0), n)
    fresh = build_unet(seed=0)
    _attach(fresh, method)
    assert method.trainable_parameters(fresh) == wide.lora_parameters


def test_save_load_round_trip(tmp_path):
    unet = build_unet(seed=0)
    _attach(unet, LoRA(rank=4, alpha=8))
    _randomize_lora(unet)
    expected = _out(unet)
    path = save_lora(unet, tmp_path / "style.safetensors")
    tensors, meta = load_tensors(path)
    assert all("lora_" in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 4 * PER_RANK_ATTENTION
    assert meta["lora_config"]["r"] == 4 and meta["lora_config"]["lora_alpha"] == 8

    other = build_unet(seed=0)
    assert not torch.allclose(_out(other), expected)
    load_lora(other, path)
    torch.testing.assert_close(_out(other), expected)


def test_merge_gives_a_plain_model_with_the_same_outputs():
    plain = build_unet(seed=0)
    keys = set(plain.state_dict())
    unet = build_unet(seed=0)
    _attach(unet)
    _randomize_lora(unet)
    adapted = _out(unet)
    assert not torch.allclose(adapted, _out(plain))
    merged = merge_lora(unet)
    assert not has_lora(merged) and set(merged.state_dict()) == keys
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(_out(merged), adapted, atol=1e-5, rtol=1e-4)
    _attach(merged)  # plain again: a new LoRA can go on


def test_lora_trains_through_the_course_loop(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    h = train(tiny_pipe, ds, LoRA(rank=2), steps=2, batch_size=4, progress=False)
    assert len(h) == 2
    after = tiny_pipe.unet.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert not changed  # base weights frozen
    assert any(not torch.all(v == 0) for k, v in after.items() if "lora_B" in k)  # B has moved off zero


def test_errors(tmp_path):
    unet = build_unet(seed=0)
    with pytest.raises(ConfigError, match="to_qq.*Valid names include.*to_q"):
        _attach(unet, LoRA(target_modules=("to_qq",)))
    with pytest.raises(ConfigError, match="rank"):
        LoRA(rank=0)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        save_lora(unet, tmp_path / "x.safetensors")
    _attach(unet)
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        _attach(unet)
    with_sara = build_unet(seed=0)
    _attach(with_sara, SaRA(fraction=0.1))
    with pytest.raises(ConfigError, match="SaRA"):
        _attach(with_sara)
    detach(with_sara)
    _attach(with_sara)  # a plain model again

    _randomize_lora(unet)
    path = save_lora(unet, tmp_path / "r4.safetensors")
    wrong_rank = build_unet(seed=0)
    with pytest.raises(CheckpointError, match="another rank"):
        load_lora(wrong_rank, path, config=LoRA(rank=8))
    assert not has_lora(wrong_rank)  # a failed load leaves the model as it was
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora(build_unet(seed=0), tmp_path / "missing.safetensors")


def test_lora_rank_matching_rejects_bad_counts():
    with pytest.raises(ConfigError, match="n_params"):
        lora_rank_matching(build_unet(seed=0), 0)
    with pytest.raises(ConfigError, match="diffusers model"):
        _attach(nn.Sequential(nn.Linear(2, 2)), LoRA(target_modules=("0",)))
