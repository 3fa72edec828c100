import pytest
import torch

from sara_edu.world.model import TinyDiffusion, build_unet
from sara_edu.world.text import TinyTextEncoder


@pytest.fixture
def tiny_pipe():
    """A randomly initialised course model (same config as the shipped one)."""
    return TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
