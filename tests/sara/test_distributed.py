"""SaRA on 2 processes (gloo, CPU) trains exactly like 1 process with the same global batch.

Each fixture launches a script from ``tests/sara/scripts`` twice: on 2
processes (torchrun / accelerate launch) and as the one-process reference.
The scripts save the weights after every optimizer step; the tests compare.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _run(cmd, timeout=1800, **env):  # a ceiling against a hang only: busy machines are slow
    out = subprocess.run([str(c) for c in cmd], env=_env(**env), capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(out.stdout + out.stderr)[-4000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(folder, name):
    return load_file(folder / f"{name}.safetensors"), json.loads((folder / f"{name}.json").read_text())


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = SCRIPTS / "ddp_sara.py"
    _run([sys.executable, script, out])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, out])
    return {name: _load(out, name) for name in ("single", "rank0", "rank1")}


@pytest.fixture(scope="module")
def ddp_graph_runs(tmp_path_factory):
    """The same 2-process run with cuda_graphs=True and the CPU stand-in of a CUDA graph."""
    out = tmp_path_factory.mktemp("ddp_graphs")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          SCRIPTS / "ddp_sara.py", out], SARA_EDU_GRAPH_STAND_IN="1")
    return {name: _load(out, name) for name in ("rank0", "rank1")}


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    script = SCRIPTS / "accelerate_sara.py"
    # accelerate 1.15: a MULTI_CPU config without an mpirun hostfile starts ONE process; --multi_gpu on a
    # machine without GPUs (and Accelerator(cpu=True)) starts 2 CPU processes on gloo. The script records
    # accelerator.distributed_type and num_processes, checked below.
    config = out / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                      "num_machines: 1\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
                      f"main_process_port: {_free_port()}\nmixed_precision: 'no'\ngpu_ids: all\nuse_cpu: false\n")
    _run([sys.executable, script, out, "--per-device-batch", "4"])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, script, out,
          "--per-device-batch", "2"])
    return {name: _load(out, name) for name in ("single", "rank0", "rank1")}


# ----------------------------------------------------------------- torch.distributed


def test_ddp_ranks_are_identical_after_every_step_and_match_one_process(ddp_runs):
    (single, single_facts), (r0, facts0), (r1, facts1) = ddp_runs["single"], ddp_runs["rank0"], ddp_runs["rank1"]
    assert facts0["world"] == 2 and single_facts["world"] == 1
    steps = sorted(k for k in r0 if k.startswith("ddp/"))
    assert len(steps) >= 5
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        reference = single[key.replace("ddp/", "bare/")]
        assert _max_diff(r0[key], reference) <= TOLERANCE, key
    moved = _max_diff(single["bare/step5"], single["bare/step0"])
    assert moved > 100 * TOLERANCE  # the comparison is not vacuous
    for variant in ("ddp", "bare"):  # clipping through model.parameters() saw the global gradient
        assert facts0[variant]["norms"] == facts1[variant]["norms"]
        assert facts0[variant]["norms"] == pytest.approx(single_facts["bare"]["norms"], rel=1e-5)
        assert min(facts0[variant]["norms"]) > 5 * 0.05  # MAX_NORM: clipping was active


def test_ddp_progressive_adjustment_agrees_and_can_empty_a_weight(ddp_runs):
    single_facts, facts0, facts1 = (ddp_runs[n][1] for n in ("single", "rank0", "rank1"))
    for variant in ("ddp", "bare"):
        assert facts0[variant]["churn"] == facts1[variant]["churn"] == single_facts["bare"]["churn"]
        # a weight whose entries all froze stops requiring grad mid-run: DDP must not crash or hang
        assert facts0[variant]["emptied_weights"] == single_facts["bare"]["emptied_weights"] != []
        assert facts0[variant]["trainable_now"] < facts0[variant]["selected"]


def test_ddp_resume_from_state_dict_equals_the_uninterrupted_run(ddp_runs):
    (single, _), (r0, _), (r1, _) = ddp_runs["single"], ddp_runs["rank0"], ddp_runs["rank1"]
    assert torch.equal(r0["resume/final"], r0["ddp/step5"])
    assert torch.equal(r1["resume/final"], r1["ddp/step5"])
    assert torch.equal(single["resume/final"], single["bare/step5"])


def test_ddp_with_cuda_graphs_replays_the_eager_ddp_run_bit_for_bit(ddp_runs, ddp_graph_runs):
    # the averaged gradients are copied into the graph's buffers in place; the replayed step is the eager one
    for rank in ("rank0", "rank1"):
        eager, _ = ddp_runs[rank]
        graphed, facts = ddp_graph_runs[rank]
        assert set(graphed) == {k for k in eager if not k.startswith("tied/")}
        for key in graphed:
            assert torch.equal(graphed[key], eager[key]), f"{rank} {key}"
        for stats in (facts["ddp"]["graph_stats"], facts["bare"]["graph_stats"], facts["resume_graph_stats"]):
            assert stats["replays"] >= 2, stats


def test_ddp_never_holds_sara_weights_and_only_selected_values_travel(ddp_runs):
    facts = ddp_runs["rank0"][1]
    ddp = facts["ddp"]
    assert facts["ddp_reducer_numel"] <= 8  # DDP's buckets: the anchor only (lin2.bias), not 10k weights
    assert ddp["dense_grads"] == []  # no dense gradient anywhere after training
    # per step: one flag per trained weight + the selected values (+ a one-off check of the weights)
    n_steps, flags = 6, 4 * 7
    assert ddp["bytes_communicated"] < n_steps * (flags + 4 * ddp["selected"]) + 1000
    assert ddp["bytes_communicated"] > n_steps * 4 * ddp["trainable_now"]
    assert facts["attach_after_wrapping"].startswith("ConfigError") and "bare model" in facts["attach_after_wrapping"]
    assert facts["clip_inside_no_sync"].startswith("ConfigError") and "no_sync" in facts["clip_inside_no_sync"]
    for rank in ("rank0", "rank1"):
        assert ddp_runs[rank][1]["different_weights"].startswith("ConfigError: the processes attached SaRA to "
                                                                 "different weights")


def test_ddp_misuse_is_refused_at_the_first_forward_pass_with_what_to_do(ddp_runs):
    for rank in ("rank0", "rank1"):
        facts = ddp_runs[rank][1]
        before = facts["wrapped_before_attaching"]
        assert before.startswith("ConfigError: DistributedDataParallel wrapped this model before SaRAAdamW attached")
        assert "Create the optimizer on the bare model first, then wrap" in before and "SelectedGrad" in before
        parent = facts["sara_on_a_submodule"]
        assert parent.startswith("ConfigError: DistributedDataParallel wraps a Parent that contains the module SaRA "
                                 "attached to (at 'inner')")
        assert "DistributedDataParallel(parent.inner)" in parent


def test_tied_weights_train_under_ddp_like_one_process(ddp_runs):
    (single, _), (r0, facts0), (r1, _) = ddp_runs["single"], ddp_runs["rank0"], ddp_runs["rank1"]
    assert int(single["tied/selected_in_a"]) > 10  # SaRA trains the tied matrix
    assert {"a.weight", "b.weight"} <= set(facts0["tied_ignored"])  # both names of the tied matrix
    assert torch.equal(r0["tied/final"], r1["tied/final"])
    update = _max_diff(single["tied/final"], single["tied/initial"])
    assert update > 1e-3 and torch.equal(r0["tied/initial"], single["tied/initial"])
    assert _max_diff(r0["tied/final"], single["tied/final"]) < TOLERANCE * max(update, 1.0)


def test_accelerate_that_does_not_shard_the_data_is_refused_and_names_the_variable(ddp_runs):
    for rank in ("rank0", "rank1"):
        facts = ddp_runs[rank][1]
        assert facts["accelerate_type"] == "DistributedType.NO"  # what accelerate does on CPU without the variable
        error = facts["accelerate_not_distributed"]
        assert error.startswith("ConfigError: this is one of 2 processes") and "DistributedType.NO" in error
        assert "ACCELERATE_USE_CPU=true" in error


# ----------------------------------------------------------------- accelerate launch, the diffusers loop


def test_accelerate_diffusers_loop_matches_one_process_and_really_clips(accelerate_runs):
    (single, single_facts), (r0, facts0), (r1, facts1) = (accelerate_runs[n] for n in ("single", "rank0", "rank1"))
    assert facts0["distributed_type"] == "DistributedType.MULTI_CPU" and facts0["num_processes"] == 2
    assert facts0["clip1"]["wrapped"] == "DistributedDataParallel"  # prepare wrapped it, as in diffusers
    for run in ("clip1", "clip_tiny"):
        assert r0[run].shape[0] >= 5  # weights after each of >= 5 optimizer steps
        assert torch.equal(r0[run], r1[run]), f"ranks differ in {run}"
        assert _max_diff(r0[run], single[run]) <= TOLERANCE, run
        # the returned norm is the synchronised norm of the selected gradient (one process: the same numbers)
        assert facts0[run]["norms"] == facts1[run]["norms"]
        assert facts0[run]["norms"] == pytest.approx(single_facts[run]["norms"], rel=1e-9)
        assert min(facts0[run]["norms"]) > 0.1
        assert facts0[run]["churn_froze"] == single_facts[run]["churn_froze"] > 0
        assert facts0[run]["bytes_communicated"] > 0
    # max_grad_norm=1e-9 really clipped (with SaRA's dense grads gone it used to be a silent no-op)
    for weights in (single, r0):
        assert _max_diff(weights["clip1"][0], weights["clip_tiny"][0]) > 1e-5
