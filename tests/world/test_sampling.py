"""Every sampler checks its arguments first: a wrong one is named, never a NaN image or a torch traceback."""
import pytest
import torch

from sara_edu.errors import ConfigError, DataError, PromptError
from sara_edu.world.model import generate

BAD_SAMPLING = [
    ({"prompts": []}, PromptError, "prompts is empty"),
    ({"prompts": None}, PromptError, "prompts must be a string or a list of strings, got NoneType"),
    ({"prompts": 3}, PromptError, "prompts must be a string or a list of strings, got int"),
    ({"prompts": {"a digit 1"}}, PromptError, "got set"),
    ({"prompts": ["a digit 1", 7]}, PromptError, r"prompts\[1\] is int 7, not a string"),
    ({"prompts": ["a digit 1", None]}, PromptError, r"prompts\[1\] is NoneType"),
    ({"steps": 2.0}, ConfigError, r"steps must be an integer, got float 2.0 \(write steps=2\)"),
    ({"steps": "10"}, ConfigError, "steps must be an integer, got str '10'"),
    ({"steps": True}, ConfigError, "steps must be an integer, got bool"),
    ({"steps": 0}, ConfigError, "steps must be between 1 and 1000, got 0"),
    ({"steps": 1001}, ConfigError, "steps must be between 1 and 1000, got 1001"),
    ({"seed": -1}, ConfigError, "seed must be between 0 and"),
    ({"seed": 2**63}, ConfigError, "seed must be between 0 and"),
    ({"seed": 1.5}, ConfigError, "seed must be an integer, got float 1.5"),
    ({"seed": None}, ConfigError, "seed must be an integer, got NoneType"),
    ({"batch_size": 0}, ConfigError, "batch_size must be >= 1, got 0"),
    ({"batch_size": 2.5}, ConfigError, "batch_size must be an integer"),
    ({"guidance_scale": float("nan")}, ConfigError, "guidance_scale must be a finite number >= 0.*got nan"),
    ({"guidance_scale": float("inf")}, ConfigError, "guidance_scale must be a finite number >= 0.*got inf"),
    ({"guidance_scale": -1.0}, ConfigError, "guidance_scale must be a finite number >= 0.*got -1.0"),
    ({"guidance_scale": "3"}, ConfigError, "guidance_scale must be a number, got str"),
]


@pytest.fixture(scope="module")
def sd_pipe():
    from sara_edu.sd.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


def _call(fn, pipe, **changes):
    args = {"prompts": ["a digit 1"], "steps": 1, "seed": 0, "guidance_scale": 3.0, "batch_size": 4, **changes}
    return fn(pipe, args.pop("prompts"), **args)


@pytest.mark.parametrize("changes,error,msg", BAD_SAMPLING)
def test_generate_names_the_bad_argument(tiny_pipe, changes, error, msg):
    with pytest.raises(error, match=msg):
        _call(generate, tiny_pipe, **changes)


@pytest.mark.parametrize("changes,error,msg", BAD_SAMPLING + [
    ({"negative_prompt": ["ugly"]}, PromptError, "negative_prompt must be a string or None, got list"),
])
def test_generate_sd_names_the_bad_argument(sd_pipe, changes, error, msg):
    from sara_edu.sd.sample import generate_sd

    with pytest.raises(error, match=msg):
        _call(generate_sd, sd_pipe, **changes)


def test_samplers_refuse_a_bare_unet(tiny_pipe):
    from sara_edu.sd.sample import generate_sd

    with pytest.raises(ConfigError, match=r"generate needs the whole model.*got UNet2DConditionModel.*TinyDiffusion\(unet\)"):
        generate(tiny_pipe.unet, ["a digit 1"])
    with pytest.raises(ConfigError, match="generate_sd needs a StableDiffusionAdapter.*got TinyDiffusion"):
        generate_sd(tiny_pipe, ["a digit 1"])


def test_a_generator_of_prompts_and_numpy_integers_work_like_a_list(tiny_pipe):
    import numpy as np

    a = generate(tiny_pipe, ["a digit 1", "a digit 2"], steps=np.int64(1), seed=np.int64(3))
    b = generate(tiny_pipe, (f"a digit {d}" for d in (1, 2)), steps=1, seed=3)
    assert torch.equal(a, b)


def test_non_finite_weights_give_an_error_naming_them_not_nan_images(tiny_pipe):
    with torch.no_grad():
        tiny_pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite: conv_in.weight \(1 of 864\)"):
        generate(tiny_pipe, ["a digit 1"], steps=1)


def test_generate_restores_the_training_mode_when_it_fails(tiny_pipe):
    tiny_pipe.unet.train()
    with pytest.raises(PromptError):  # an unknown word fails inside the loop
        generate(tiny_pipe, ["a digit 1", "a unicorn"], steps=1, batch_size=1)
    assert tiny_pipe.unet.training


@pytest.mark.parametrize("kwargs,error,msg", [
    ({"digits": 3}, DataError, "digits must be a collection"),
    ({"digits": "37"}, DataError, "digits must be a collection"),
    ({"digits": []}, DataError, "non-empty collection of integers 0..9"),
    ({"digits": [3.5]}, DataError, "integers 0..9"),
    ({"digits": [True]}, DataError, "integers 0..9"),
    ({"n_per_digit": 2.0}, ConfigError, "n_per_digit must be an integer"),
    ({"steps": 0}, ConfigError, "steps must be between 1 and 1000"),
    ({"seed": -3}, ConfigError, "seed must be between 0"),
    ({"guidance_scale": float("nan")}, ConfigError, "guidance_scale must be a finite number"),
])
@pytest.mark.parametrize("which", ["evaluate", "per_digit_recognition"])
def test_metrics_check_sampling_before_generating(tiny_pipe, which, kwargs, error, msg):
    from sara_edu.world import metrics

    with pytest.raises(error, match=msg):
        getattr(metrics, which)(tiny_pipe, **kwargs)


def test_prompt_agreement_refuses_fractional_digits():
    from sara_edu.world.metrics import prompt_agreement

    with pytest.raises(DataError, match="integers 0..9"):
        prompt_agreement(torch.zeros(2, 3, 16, 16), [3.7, 1])


@pytest.mark.parametrize("kwargs,msg", [({"seed": 0.5}, "seed must be an integer"),
                                        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite"),
                                        ({"steps": "5"}, "steps must be an integer")])
def test_lesson_samplers_pass_the_checks_on(tiny_pipe, kwargs, msg):
    from sara_edu.lessons.display import sample_figure
    from sara_edu.lessons.sara_vs_lora import side_by_side

    with pytest.raises(ConfigError, match=msg):
        sample_figure(tiny_pipe, digits=[1], **kwargs)
    with pytest.raises(ConfigError, match=msg):
        side_by_side({"pretrained": tiny_pipe}, "a digit 1", n=1, **kwargs)


def test_non_finite_text_encoder_weights_are_named_too(tiny_pipe):
    with torch.no_grad():
        tiny_pipe.text_encoder.position.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite: text_encoder.position.weight \(1 of [\d,]+\).*"
                                                 r"damaged model file"):
        generate(tiny_pipe, ["a digit 1"], steps=1)


def test_finite_float32_weights_that_overflow_are_not_told_to_sample_in_float32(tiny_pipe):
    with torch.no_grad():
        tiny_pipe.unet.conv_out.weight.fill_(3e38)  # finite, but the sums overflow to inf
    with pytest.raises(FloatingPointError) as caught:
        generate(tiny_pipe, ["a digit 1"], steps=1)
    message = str(caught.value)
    assert "already" not in message and "float32 (pipe.unet.float())" not in message
    assert "largest |w| is 3e+38 (in conv_out.weight)" in message and "lower lr" in message
