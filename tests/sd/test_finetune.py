"""The fine-tuning command, run as a user would: two processes, checkpoints, resume, a file that loads."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from sara_edu.io import load_tensors
from sara_edu.sara import load_sparse
from sara_edu.sd import generate_sd, load_stable_diffusion, tiny_sd_pipeline
from sara_edu.sd.finetune import build_parser, make_method
from sara_edu.world.data import StyleDataset, export_image_folder

PROMPT = "a digit 1, cyberpunk style"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tiny_sd_pipeline(seed=0).pipeline().save_pretrained(root / "model", safe_serialization=True)
    export_image_folder(StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=4), root / "data")
    return root


def _finetune(root, out, *args, processes=2):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={port.getsockname()[1]}"]
    port.close()
    cmd = [*launcher, "-m", "sara_edu.sd.finetune", "--model", str(root / "model"), "--data", str(root / "data"),
           "--out", str(out), "--steps", "4", "--batch-size", "4", "--gradient-accumulation-steps", "2",
           "--threshold", "0.02", "--validation-prompt", PROMPT, "--validation-steps", "2", "--no-progress", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,  # a ceiling against a hang only
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


def test_two_processes_save_resume_and_the_sparse_file_loads_into_a_fresh_pipeline(model_and_data, tmp_path):
    root = model_and_data
    straight = _finetune(root, tmp_path / "straight")
    assert straight["processes"] == 2
    first = tmp_path / "resumed"
    _finetune(root, first, "--stop-after", "2", "--checkpoint-every", "2")
    assert (first / "checkpoints" / "step_000002" / "complete.json").exists()
    resumed = _finetune(root, first, "--resume")
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    a, b = load_tensors(tmp_path / "straight" / "sara.safetensors")[0], load_tensors(first / "sara.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a fresh pipeline + the tiny file gives exactly the fine-tuned model's images, and they differ from the base's
    # sample with the command's thread count: CPU kernels sum in another order with more threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_stable_diffusion(root / "model")
        base = generate_sd(pipe, [PROMPT], steps=2, seed=0)
        load_sparse(pipe.unet, first / "sara.safetensors")
        images = generate_sd(pipe, [PROMPT], steps=2, seed=0)
    finally:
        torch.set_num_threads(threads)
    saved = load_tensors(first / "validation" / "final.safetensors")[0]["images"]
    assert torch.equal(images, saved)
    assert (images - base).abs().max() > 1e-3


def test_the_paper_defaults_and_clear_errors():
    args = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    method = make_method(args)
    assert (args.method, method.threshold, method.rank_lambda, method.progressive_iter) == ("sara", 2e-3, 5e-4, "half")
    assert (args.weight_decay, args.lr) == (1e-2, 1e-4)
    bad = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--progressive-iter", "soon"])
    with pytest.raises(ValueError, match="progressive-iter"):
        make_method(bad)
