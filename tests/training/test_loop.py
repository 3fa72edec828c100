import math

import pytest
import torch

from sara_edu.errors import ConfigError, DataError
from sara_edu.training.loop import train
from sara_edu.training.method import TrainingMethod
from sara_edu.world.data import StyleDataset, TensorImageDataset


def test_training_reduces_the_loss(tiny_pipe):
    ds = StyleDataset(None, digits=[0, 1], limit_per_digit=16)
    h = train(tiny_pipe, ds, steps=40, lr=2e-3, batch_size=16, warmup_steps=5, progress=False, seed=0)
    assert list(h.columns) == ["step", "loss", "lr", "step_time_s", "peak_memory_mb"]
    assert len(h) == 40 and (h.step_time_s > 0).all()
    assert h.loss.tail(10).mean() < 0.6 * h.loss.head(5).mean()
    # cosine schedule with warm-up: ramps up, then decays to ~0
    assert h.lr.iloc[0] < h.lr.iloc[4] == pytest.approx(2e-3) and h.lr.iloc[-1] < 0.01 * 2e-3


def test_training_is_seeded(tiny_pipe):
    import copy

    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    a = train(copy.deepcopy(tiny_pipe), ds, steps=3, batch_size=4, progress=False, seed=1)
    b = train(copy.deepcopy(tiny_pipe), ds, steps=3, batch_size=4, progress=False, seed=1)
    assert a.loss.tolist() == pytest.approx(b.loss.tolist(), rel=1e-5)


def test_method_seam_controls_what_trains(tiny_pipe):
    class OnlyConvIn(TrainingMethod):
        name = "conv_in"

        def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
            unet.requires_grad_(False)
            unet.conv_in.requires_grad_(True)
            return torch.optim.AdamW(unet.conv_in.parameters(), lr=lr)

    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    train(tiny_pipe, ds, OnlyConvIn(), steps=2, batch_size=4, progress=False)
    changed = {k for k, v in tiny_pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"conv_in.weight", "conv_in.bias"}
    assert OnlyConvIn().trainable_parameters(tiny_pipe.unet) == sum(p.numel() for p in tiny_pipe.unet.conv_in.parameters())


@pytest.mark.parametrize("kwargs, msg", [
    ({"lr": -1e-4}, "learning rate"), ({"lr": math.nan}, "learning rate"), ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"), ({"warmup_steps": 50, "steps": 10}, "warmup"),
    ({"mixed_precision": "fp8"}, "mixed_precision"), ({"cond_dropout": 1.5}, "cond_dropout"),
])
def test_impossible_hyperparameters(tiny_pipe, kwargs, msg):
    ds = StyleDataset(None, digits=[3], limit_per_digit=4)
    with pytest.raises(ConfigError, match=msg):
        train(tiny_pipe, ds, **{"steps": 2, **kwargs}, progress=False)


def test_empty_dataset_is_a_clear_error(tiny_pipe):
    with pytest.raises(DataError, match="empty"):
        train(tiny_pipe, [], steps=1, progress=False)
    with pytest.raises(DataError, match="empty"):
        TensorImageDataset(torch.zeros(0, 3, 16, 16), [])
