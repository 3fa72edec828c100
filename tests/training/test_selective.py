import copy

import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.sara.attach import detach
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.selection import select_parameters
from sara_edu.sara.sparse_file import load_sparse
from sara_edu.training.loop import train
from sara_edu.training.selective import MaskedAdamW, SelectiveFineTuning
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import build_unet


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 4, 32, generator=g)


def _step(unet, opt, seed):
    x, t, c = _batch(seed)
    unet(x, t, c).sample.pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_selective_trains_the_same_entries_as_sara_and_keeps_the_rest_bitwise():
    """Dense masked AdamW (with masked weight decay) == SaRA's sparse AdamW on the selected entries."""
    unet = build_unet(seed=0)
    twin = copy.deepcopy(unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    selection = select_parameters(unet, fraction=0.1)
    dense = MaskedAdamW(unet, selection, lr=1e-3, weight_decay=0.5)
    sparse = SaRAAdamW(twin, lr=1e-3, fraction=0.1, rank_lambda=0, weight_decay=0.5)
    x, t, c = _batch(0)
    unet(x, t, c).sample.pow(2).mean().backward()
    for n, p in unet.named_parameters():  # dense grads survive, masked
        if n in dense.masks:
            assert p.grad is not None and not p.grad[~dense.masks[n]].any()
            assert p.grad[dense.masks[n]].any()
        else:
            assert p.grad is None and not p.requires_grad
    dense.step()
    dense.zero_grad()
    _step(twin, sparse, 0)
    for s in range(1, 4):
        _step(unet, dense, s)
        _step(twin, sparse, s)
    for (n, p), q in zip(unet.named_parameters(), twin.parameters()):
        m = selection.mask(n)
        assert torch.equal(p[~m], base[n][~m]), n
        torch.testing.assert_close(p[m], q[m], rtol=0, atol=1e-6)
    # moments are dense: the "no memory trick" comparison
    state_numel = sum(v.numel() for st in dense.state.values() for k, v in st.items() if k != "step")
    assert state_numel == 2 * sum(p.numel() for n, p in unet.named_parameters() if n in dense.masks)


def test_selective_method_with_the_train_loop_and_files(tiny_pipe, tmp_path):
    method = SelectiveFineTuning(fraction=0.2)
    base = copy.deepcopy(tiny_pipe.unet)
    ds = StyleDataset(None, digits=[0, 1], limit_per_digit=8)
    h = train(tiny_pipe, ds, method, steps=12, lr=1e-2, batch_size=8, progress=False, seed=0)
    assert h.loss.tail(4).mean() < h.loss.head(2).mean()
    assert method.trainable_parameters(tiny_pipe.unet) == method.report().iloc[-1].selected
    path = method.save(tmp_path / "selective.safetensors")
    x, t, c = _batch(3)
    with torch.no_grad():
        expected = tiny_pipe.unet(x, t, c).sample
        assert torch.equal(load_sparse(base, path)(x, t, c).sample, expected)
    with pytest.raises(ConfigError, match="already attached"):
        SaRAAdamW(tiny_pipe.unet, fraction=0.1)
    detach(method)
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())
    assert all(not p._backward_hooks for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize("kwargs, msg", [
    ({"fraction": 0.0}, "between"), ({"threshold": -1.0}, "positive"),
    ({"threshold": 1e-30, "target_modules": "conv_in.weight"}, "selects no weight")])
def test_selective_bad_input(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        SelectiveFineTuning(**kwargs).build_optimizer(build_unet(seed=0), lr=1e-3, weight_decay=0.0, total_steps=5)
