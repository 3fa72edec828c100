"""Shared fixtures, and one thread per test process.

Why one thread: with torch's default of one OpenMP thread per core, every test process, notebook kernel and
subprocess spins its threads while other processes hold the cores, and a suite that costs 8.8 CPU-min on a quiet
2-core box cost 29.9 CPU-min at load ~10. Set before torch is imported, the variables also reach everything the
tests start (kernels, torchrun ranks, the README's blocks), which inherit this environment. Set
``SARA_EDU_TEST_THREADS`` to use more threads. The parallelism comes from processes instead: ``make test``
runs two pytest-xdist workers (``-n 2``; ``PYTEST_ARGS="-n 0"`` runs serially).
"""
import os

TEST_THREADS = os.environ.get("SARA_EDU_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = TEST_THREADS

import pytest  # noqa: E402 - after the thread settings, which must precede torch's OpenMP start-up
import torch  # noqa: E402

torch.set_num_threads(int(TEST_THREADS))

from sara_edu.world.model import TinyDiffusion, build_unet
from sara_edu.world.text import TinyTextEncoder


@pytest.fixture
def tiny_pipe():
    """A randomly initialised course model (same config as the shipped one)."""
    return TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def launched_rank(monkeypatch):
    """This process as one rank of a 2-process launch, before ``init_process_group``: a fresh torchrun process.

    ``WORLD_SIZE=2``, and no Accelerate state: an Accelerator an earlier test created in this process
    (``train()`` makes one, as ``DistributedType.NO``) would otherwise look like this launch's own.
    """
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
