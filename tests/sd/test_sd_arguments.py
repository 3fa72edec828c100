"""The Stable Diffusion adapter and loaders name a wrong argument instead of failing inside transformers/diffusers."""
import pytest
import torch

from sara_edu.errors import ConfigError, DataError, PromptError


@pytest.fixture(scope="module")
def sd_pipe():
    from sara_edu.sd.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.mark.parametrize("call,error,msg", [
    (lambda p: p.encode(None), PromptError, "prompts must be a string or a list of strings, got NoneType"),
    (lambda p: p.encode([3]), PromptError, r"prompts\[0\] is int 3, not a string"),
    (lambda p: p.encode([]), PromptError, "prompts is empty"),
    (lambda p: p.encode_images([1]), DataError, r"pixels must be a tensor of shape \(N, 3, H, W\).*got list"),
    (lambda p: p.encode_images(torch.zeros(3, 64, 64)), DataError, r"got \(3, 64, 64\) \(add a batch dimension"),
    (lambda p: p.with_unet([1]), ConfigError, "with_unet needs a UNet module"),
])
def test_adapter_arguments(sd_pipe, call, error, msg):
    with pytest.raises(error, match=msg):
        call(sd_pipe)


@pytest.mark.parametrize("kwargs,msg", [
    ({"model_id_or_path": 123}, "model_id_or_path must be a Hub id .* got int 123"),
    ({"model_id_or_path": "sd15", "dtype": "float16"}, "dtype must be a torch dtype such as torch.float16, got str"),
    ({"model_id_or_path": "sd15", "unet_dtype": 16}, "unet_dtype must be a torch dtype"),
])
def test_loader_arguments(kwargs, msg):
    from sara_edu.sd.load import load_stable_diffusion

    with pytest.raises(ConfigError, match=msg):
        load_stable_diffusion(local_files_only=True, **kwargs)


def test_tiny_pipeline_seed_is_checked():
    from sara_edu.sd.tiny import tiny_sd_pipeline

    with pytest.raises(ConfigError, match="seed must be an integer, got str 'x'; it seeds the random weights"):
        tiny_sd_pipeline(seed="x")
