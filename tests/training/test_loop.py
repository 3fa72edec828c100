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


@pytest.mark.parametrize("kwargs, msg", [
    ({"max_grad_norm": math.nan}, "max_grad_norm"), ({"max_grad_norm": math.inf}, "max_grad_norm"),
    ({"max_grad_norm": 0}, "max_grad_norm"), ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"), ({"steps": 2.0}, "steps"),
    ({"weight_decay": math.nan}, "weight_decay"), ({"checkpoint_every": 2}, "checkpoint_dir"),
    ({"batch_size": 2, "gradient_accumulation_steps": 4}, "batch_size"),
])
def test_silently_wrong_settings_are_refused(tiny_pipe, kwargs, msg):
    ds = StyleDataset(None, digits=[3], limit_per_digit=4)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    with pytest.raises(ConfigError, match=msg):
        train(tiny_pipe, ds, **{"steps": 2, **kwargs}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())  # nothing trained


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_get_the_fix_and_float64_trains(tiny_pipe, dtype):
    import copy

    ds = StyleDataset(None, digits=[3], limit_per_digit=4)
    half = copy.deepcopy(tiny_pipe)
    half.unet.to(dtype)
    with pytest.raises(ConfigError, match=r"float32.*unet.float\(\)|unet\.float\(\)"):
        train(half, ds, steps=1, batch_size=4, progress=False)
    double = copy.deepcopy(tiny_pipe)
    double.unet.double()
    h = train(double, ds, steps=2, batch_size=4, progress=False)
    assert h.loss.notna().all() and next(double.unet.parameters()).dtype == torch.float64


def test_ctrl_c_keeps_the_steps_done_and_leaves_a_plain_model(tiny_pipe):
    from sara_edu.sara import attached_owner
    from sara_edu.training import SaRA

    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    method = SaRA(fraction=0.1)

    def interrupt(step, pipe, optimizer):
        if step == 3:
            raise KeyboardInterrupt

    h = train(tiny_pipe, ds, method, steps=10, batch_size=4, progress=False, callback=interrupt)
    assert h.step.tolist() == [1, 2, 3] and "interrupted" in h.attrs["interrupted"]
    assert attached_owner(tiny_pipe.unet) is None and method.optimizer.detached


def test_a_nan_loss_raises_with_the_partial_history_and_the_last_good_weights(tiny_pipe):
    from sara_edu.training import SaRA

    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    snapshot = {}

    def poison(step, pipe, optimizer):
        if step == 2:
            snapshot.update({k: v.clone() for k, v in pipe.unet.state_dict().items()})
            with torch.no_grad():
                pipe.unet.conv_out.bias.fill_(float("nan"))  # the next forward pass gives NaN

    method = SaRA(fraction=0.1)
    with pytest.raises(FloatingPointError, match="step 3") as caught:
        train(tiny_pipe, ds, method, steps=10, batch_size=4, progress=False, callback=poison)
    assert caught.value.history.step.tolist() == [1, 2]
    assert method.optimizer.detached
    changed = [k for k, v in tiny_pipe.unet.state_dict().items() if not torch.equal(v, snapshot[k]) and k != "conv_out.bias"]
    assert changed == []  # no update was applied at the step whose loss was NaN


def test_weights_non_finite_before_training_are_blamed_not_the_learning_rate(tiny_pipe):
    from sara_edu.errors import CheckpointError

    with torch.no_grad():
        tiny_pipe.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"before any training step, 1 NaN or infinite values in 1 tensor: "
                                              r"conv_out.weight \(1 of 864\)\. Lowering the learning rate will "
                                              r"not help.*Reload the model") as caught:
        train(tiny_pipe, StyleDataset(None, digits=[3], limit_per_digit=4), steps=2, batch_size=4, progress=False)
    assert "lower the learning" not in str(caught.value)


def test_a_method_that_leaves_nothing_on_the_forward_path_gets_a_clear_error(tiny_pipe):
    class OutsideTheModel(TrainingMethod):
        name = "outside"

        def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
            unet.requires_grad_(False)
            return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)

    with pytest.raises(ConfigError, match=r"the loss depends on no trainable parameter at step 1: method 'outside'"):
        train(tiny_pipe, StyleDataset(None, digits=[3], limit_per_digit=4), OutsideTheModel(), steps=2, batch_size=4,
              progress=False)


def test_when_progressive_adjustment_freezes_every_entry_the_run_says_so_and_keeps_its_steps(tiny_pipe):
    from sara_edu.training import SaRA

    with torch.no_grad():
        tiny_pipe.unet.conv_out.weight.view(-1)[:3] = 1e-12  # three tiny weights: the first update moves them past θ
    method = SaRA(threshold=1e-10, fraction=None, progressive_iter=1)
    with pytest.raises(ConfigError, match=r"nothing trains any more at step 2: progressive adjustment froze every "
                                          r"trained entry .*progressive_iter=None") as caught:
        train(tiny_pipe, StyleDataset(None, digits=[3], limit_per_digit=4), method, steps=3, batch_size=4,
              progress=False)
    assert caught.value.history.step.tolist() == [1] and method.optimizer.detached


@pytest.mark.parametrize("device,msg", [
    ("cuda", r"device='cuda' asks for a GPU, but (this torch is built without CUDA|no CUDA GPU is visible): pass "
             r"device='cpu' or None"),
    ("cuda:0", r"device='cuda:0' asks for a GPU"),
    ("gpu", r"device='gpu' is not a device torch knows .*pass device='cpu', 'cuda', 'cuda:N' or None"),
    (3.5, r"device=3.5 is not a device torch knows"),
])
def test_a_device_this_machine_lacks_is_named_with_what_to_pass(tiny_pipe, monkeypatch, device, msg):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    with pytest.raises(ConfigError, match=msg):
        train(tiny_pipe, StyleDataset(None, digits=[3], limit_per_digit=4), steps=1, batch_size=4, progress=False,
              device=device)
    assert next(tiny_pipe.unet.parameters()).device.type == "cpu"
