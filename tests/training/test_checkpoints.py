"""Checkpoints are whole or absent, checksummed, and resume only the run that wrote them."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.training import SaRA
from sara_edu.training.checkpoint import checkpoints
from sara_edu.training.loop import train
from sara_edu.world.data import StyleDataset

ROOT = Path(__file__).resolve().parents[2]


def _data(limit=4):
    return StyleDataset(None, digits=[3, 4], limit_per_digit=limit)


def _run(pipe, folder, data=None, **kwargs):
    kwargs = {"steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "checkpoint_dir": folder, **kwargs}
    return train(pipe, data or _data(), SaRA(fraction=0.1), **kwargs)


@pytest.fixture
def stopped(tiny_pipe, tmp_path):
    """(a fresh copy of the base, the checkpoint folder of a run stopped after step 2 of 4)."""
    base = copy.deepcopy(tiny_pipe)
    _run(tiny_pipe, tmp_path / "ck", stop_after=2, checkpoint_every=2)
    assert [p.name for p in checkpoints(tmp_path / "ck")] == ["step_000002"]
    return base, tmp_path / "ck"


@pytest.mark.parametrize("change,msg", [
    ({"lr": 2e-3}, r"lr: the checkpoint .*step_000002 was saved with 0\.001, this run gives 0\.002\. Resume with "
                   r"the same value \(lr 0\.001\), or start a new run in a new folder"),
    ({"batch_size": 2}, r"batch_size: .* saved with 4, this run gives 2"),
    ({"steps": 6}, r"steps: .* saved with 4, this run gives 6"),
    ({"data": "bigger"}, r"dataset size: .* saved with 8, this run gives 10"),
    ({"run_settings": {"--threshold": 0.5}}, None),  # a setting the first run did not record is not compared
])
def test_resume_with_other_settings_is_refused_naming_the_argument(stopped, change, msg):
    base, folder = stopped
    if "data" in change:
        change = {"data": _data(limit=5)}
    if msg is None:
        _run(base, folder, resume=True, **change)
        return
    with pytest.raises(ConfigError, match=msg):
        _run(base, folder, resume=True, **change)


def test_resume_onto_another_base_model_is_refused(stopped):
    base, folder = stopped
    with torch.no_grad():
        next(base.unet.parameters()).view(-1)[0] += 1e-6  # same architecture, other weights
    with pytest.raises(CheckpointError, match=r"trained from another base model .* resume with the --model"):
        _run(base, folder, resume=True)


def test_resume_without_a_checkpoint_and_a_new_run_over_old_checkpoints_are_refused(stopped, tmp_path):
    base, folder = stopped
    with pytest.raises(CheckpointError, match=r"--resume \(resume=True\) but .*empty holds no complete checkpoint"):
        _run(copy.deepcopy(base), tmp_path / "empty", resume=True)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of another run \(step_000002\): pass "
                                              r"--resume .* or write this run elsewhere"):
        _run(copy.deepcopy(base), folder, checkpoint_every=2)
    with pytest.raises(ConfigError, match=r"has done 2 steps, more than this run's stop_after=1"):
        _run(copy.deepcopy(base), folder, resume=True, stop_after=1)
    with pytest.raises(ConfigError, match="keep_checkpoints must be a positive integer"):
        _run(copy.deepcopy(base), tmp_path / "k", checkpoint_every=2, keep_checkpoints=0)
    with pytest.raises(ConfigError, match=r"stop_after must be a positive integer \(steps to run\) or None, got 0"):
        _run(copy.deepcopy(base), tmp_path / "k", stop_after=0)


def test_a_damaged_checkpoint_file_is_refused_by_its_checksum(stopped):
    base, folder = stopped
    f = folder / "step_000002" / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in a tensor: safetensors itself reads it without complaint
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is damaged or missing \(its SHA-256 differs"):
        _run(base, folder, resume=True)


_KILLED_MID_CHECKPOINT = """
import os, sys, torch
import sara_edu.training.checkpoint as ck
from sara_edu.training import SaRA, train
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TinyDiffusion, build_unet
from sara_edu.world.text import TinyTextEncoder

real = ck.save_state
def save_state(state, path, *a, **k):  # the step-4 checkpoint dies after writing its optimizer file
    real(state, path, *a, **k)
    if "step_000004" in str(path) and path.name == "optimizer.safetensors":
        os._exit(9)  # like kill -9: no except/finally runs
ck.save_state = save_state
torch.manual_seed(0)
pipe = TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))
train(pipe, StyleDataset(None, digits=[3, 4], limit_per_digit=4), SaRA(fraction=0.1), steps=6, batch_size=4,
      lr=1e-3, progress=False, checkpoint_dir=sys.argv[1], checkpoint_every=2)
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_whole_one(tiny_pipe, tmp_path):
    straight = train(copy.deepcopy(tiny_pipe), _data(), SaRA(fraction=0.1), steps=6, batch_size=4, lr=1e-3,
                     progress=False)
    folder = tmp_path / "ck"
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_CHECKPOINT, str(folder)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 9, done.stderr[-2000:]
    # step_000004 never appeared: its files lie in a temporary folder the next save of that step cleans
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["step_000002"]
    assert [p.name for p in checkpoints(folder)] == ["step_000002"]
    marker = json.loads((folder / "step_000002" / "complete.json").read_text())
    assert set(marker["sha256"]) == {"trained.safetensors", "optimizer.safetensors", "loop.safetensors"}
    resumed = _run(tiny_pipe, folder, steps=6, resume=True, checkpoint_every=2)
    assert resumed.step.tolist() == list(range(1, 7))
    assert resumed.loss.tolist() == pytest.approx(straight.loss.tolist(), rel=1e-6)
    assert [p.name for p in checkpoints(folder)] == ["step_000002", "step_000004", "step_000006"]
