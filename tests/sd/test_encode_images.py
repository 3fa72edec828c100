"""The VAE's latent sample of an image depends on its generator only, not on the batch it is encoded in."""
import pytest
import torch

from sara_edu.errors import ConfigError


@pytest.fixture(scope="module")
def sd_pipe():
    from sara_edu.sd.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


def test_one_generator_per_image_gives_the_same_latents_in_any_split(sd_pipe):
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    whole = sd_pipe.encode_images(pixels, generator=gens([10, 11, 12, 13]))
    torch.manual_seed(5)  # the global RNG plays no part
    halves = torch.cat([sd_pipe.encode_images(pixels[[0, 2]], generator=gens([10, 12])),
                        sd_pipe.encode_images(pixels[[1, 3]], generator=gens([11, 13]))])[[0, 2, 1, 3]]
    torch.testing.assert_close(whole, halves, rtol=1e-6, atol=1e-6)  # the VAE's conv kernels may batch differently
    assert not torch.allclose(whole, sd_pipe.encode_images(pixels, generator=gens([20, 21, 22, 23])))
    with pytest.raises(ConfigError, match="generator is a list of 2 generators for 4 images: give one per image"):
        sd_pipe.encode_images(pixels, generator=gens([1, 2]))
