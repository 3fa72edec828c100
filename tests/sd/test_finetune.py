"""The fine-tuning command, run as a user would: two processes, checkpoints, resume, a file that loads."""
import json
import os
import socket
import subprocess
import sys

import pandas as pd
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


def _trained_values(folder):
    """{name: (flat positions, trained values)} of a run's sara.safetensors."""
    tensors = load_tensors(folder / "sara.safetensors")[0]
    return {k[:-len("::values")]: (tensors[k[:-len("values")] + "indices"].long(), tensors[k])
            for k in tensors if k.endswith("::values")}


@pytest.fixture(scope="module")
def runs(model_and_data, tmp_path_factory):
    """The same run straight on 2 processes, on 1 process, and on 2 processes stopped at step 2 and resumed."""
    root, out = model_and_data, tmp_path_factory.mktemp("runs")
    straight = _finetune(root, out / "straight")
    single = _finetune(root, out / "single", processes=1)
    _finetune(root, out / "resumed", "--stop-after", "2", "--checkpoint-every", "2")
    assert (out / "resumed" / "checkpoints" / "step_000002" / "complete.json").exists()
    resumed = _finetune(root, out / "resumed", "--resume")
    return out, straight, single, resumed


def test_two_processes_equal_one_process(model_and_data, runs):
    """The VAE's latent sample, the noise and the timesteps of an image come from its place in the global batch,
    whatever process encodes it. Before, each process sampled latents from its own re-seeded global RNG: the loss
    differed from step 1 (by 3e-4 relative) and the weights by more than the update."""
    out, straight, single = runs[:3]
    assert (straight["processes"], single["processes"]) == (2, 1)
    one, two = pd.read_csv(out / "single" / "history.csv"), pd.read_csv(out / "straight" / "history.csv")
    assert two.loss.tolist() == pytest.approx(one.loss.tolist(), rel=1e-6)  # float32 summation order only
    base = dict(load_stable_diffusion(model_and_data / "model").unet.named_parameters())
    a, b = _trained_values(out / "single"), _trained_values(out / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) for k in a)  # the same entries trained
    diff = torch.cat([(a[k][1] - b[k][1]).abs() for k in a])
    update = max((a[k][1] - base[k].detach().reshape(-1)[a[k][0]]).abs().max().item() for k in a)
    # Float32 rounding of the gradients' summation order (DDP's all-reduce, split micro-batches) is ~1e-7
    # relative; AdamW divides by |g| + eps, so where a gradient is near zero that rounding can move an entry by
    # up to lr per step (measured: 8 of 319,546 entries). All others agree to a few float32 ulps of the weights.
    assert (diff > 1e-4 * update).float().mean().item() <= 1e-3
    assert diff.max().item() <= 0.1 * update


def test_two_processes_save_resume_and_the_sparse_file_loads_into_a_fresh_pipeline(model_and_data, runs):
    root = model_and_data
    out, straight, _, resumed = runs
    first = out / "resumed"
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    assert (resumed["steps"], resumed["steps_done"]) == (4, 4)
    a, b = load_tensors(out / "straight" / "sara.safetensors")[0], load_tensors(first / "sara.safetensors")[0]
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


def _refused(argv, capsys):
    """The command's message for ``argv``, which it must refuse with exit status 2."""
    from sara_edu.sd.finetune import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_resume_refuses_other_settings_another_base_and_a_damaged_checkpoint(model_and_data, runs, tmp_path,
                                                                             capsys):
    import shutil

    root, out = model_and_data, runs[0]
    args = ["--model", str(root / "model"), "--data", str(root / "data"), "--steps", "4", "--batch-size", "4",
            "--gradient-accumulation-steps", "2", "--threshold", "0.02", "--no-progress"]
    folder = tmp_path / "run"
    shutil.copytree(out / "resumed", folder)
    argv = [*args, "--out", str(folder), "--resume"]
    # before the model is loaded: each changed setting is named with the saved and the given value
    for flag, value, saved in [("--lr", "2e-4", "0.0001"), ("--threshold", "0.05", "0.02"), ("--batch-size", "8", "4"),
                               ("--steps", "2", "4"), ("--seed", "1", "0")]:
        err = _refused([*argv, flag, value], capsys)
        assert f"{flag}: the checkpoint {folder / 'checkpoints' / 'step_000002'} was saved with {saved}, this run " \
               f"gives {float(value) if flag in ('--lr', '--threshold') else int(value)}. Resume with the same value " \
               f"({flag} {saved}), or start a new run in a new folder (a new --out / checkpoint_dir)" in err
    other_data = tmp_path / "data"
    shutil.copytree(root / "data", other_data)
    (other_data / "metadata.jsonl").write_text((other_data / "metadata.jsonl").read_text().replace("cyberpunk", "x"))
    assert "--data: the checkpoint" in _refused([*argv, "--data", str(other_data)], capsys)
    # another base model: same architecture, other weights
    tiny_sd_pipeline(seed=1).pipeline().save_pretrained(tmp_path / "other_model", safe_serialization=True)
    err = _refused([*argv, "--model", str(tmp_path / "other_model")], capsys)
    assert "was trained from another base model (weights SHA-256" in err and "resume with the --model" in err
    # a new run into a folder holding another run's checkpoints, and --resume with none
    err = _refused([*args, "--out", str(folder), "--checkpoint-every", "2"], capsys)
    assert f"error: {folder / 'checkpoints'} already holds checkpoints of another run (step_000002): pass --resume" in err
    err = _refused([*args, "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert f"--resume (resume=True) but {tmp_path / 'new' / 'checkpoints'} holds no complete checkpoint to resume " \
           "from: check the folder (--out), or run without --resume to start from step 0" in err
    # one flipped bit in the optimizer's file
    opt = folder / "checkpoints" / "step_000002" / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-5] ^= 0x01
    opt.write_bytes(bytes(data))
    err = _refused(argv, capsys)
    assert f"{opt} is damaged or missing (its SHA-256 differs from the one recorded when it was saved): delete " \
           f"{opt.parent} to resume from the previous checkpoint" in err
