"""The CUDA paths: SaRA's hooks, fused step, compact state, files and the training loop on a GPU.

CI has no GPU, so these are skipped there; they run on a lent GPU machine
(``benchmarks/gpu_check.sh``). Every comparison is against the same code on the
CPU or against the exact path on the GPU, with TF32 off and deterministic cuDNN,
so that a difference means a bug, not a kernel's rounding mode.
"""
import copy
import math
import os

import pytest
import torch

from sara_edu.io import load_state, save_state
from sara_edu.measure.memory import MemoryTracker
from sara_edu.sara.grad import SelectedGrad
from sara_edu.sara.moments import moment_kind
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.sparse_file import load_sparse, save_sparse
from sara_edu.training import FullFineTuning, LoRA, SaRA, train
from sara_edu.training.shira import SHiRA
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TINY_UNET_CONFIG, TinyDiffusion, build_unet
from sara_edu.world.text import TinyTextEncoder

# SARA_EDU_GPU_TESTS_DEVICE=cpu runs them on the CPU: a dry run of the tests themselves, no GPU needed
CUDA = torch.device(os.environ.get("SARA_EDU_GPU_TESTS_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
KWARGS = dict(lr=2e-3, fraction=0.1, rank_lambda=1e-2, progressive_iter=3, weight_decay=0.1)
VARIANTS = {"no value copy": dict(value_copy=False), "delta positions": dict(positions="delta"),
            "bitmask positions": dict(positions="bitmask"), "compact": dict(compact=True),
            "compact, 8-bit": dict(compact=True, moments="8bit")}
TOLERANCE = {"fp32": 0.0, "bf16": 0.01, "8bit": 0.08}  # as tests/sara/test_compact_state.py documents


@pytest.fixture(scope="module", autouse=True)
def _exact_kernels():
    """fp32 matmuls and convolutions, the same result on every run."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def _batch(seed, device):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
    return x.to(device), torch.tensor([10, 700], device=device), c.to(device)


def _train_steps(unet, opt, n, seed=0):
    device = next(unet.parameters()).device
    for i in range(n):
        x, t, c = _batch(seed + i, device)
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _flat(model):
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def _mask(opt):
    return torch.cat([opt.selection.mask(n).reshape(-1).cpu() for n in opt.selection.names])


@pytest.fixture(scope="module")
def exact_cuda():
    """(base, mask, weights after 6 exact steps on CUDA, the optimizer), once."""
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    base = _flat(unet)
    opt = SaRAAdamW(unet, **KWARGS)
    _train_steps(unet, opt, 6)
    return base, _mask(opt), _flat(unet), opt


def test_exact_sara_on_cuda_follows_the_cpu_run(exact_cuda):
    base, mask, w_cuda, opt_cuda = exact_cuda
    assert opt_cuda.defaults["fused"]  # the fused CUDA kernel, as on the CPU
    assert all(s.values.device.type == s.idx.device.type == CUDA.type for s in opt_cuda.slots)
    cpu = build_unet(SMALL_CONFIG, seed=0)
    opt_cpu = SaRAAdamW(cpu, **KWARGS)
    assert torch.equal(_mask(opt_cpu), mask)  # the same entries selected on either device
    _train_steps(cpu, opt_cpu, 6)
    w_cpu = _flat(cpu)
    assert torch.equal(w_cuda[~mask], base[~mask])  # nothing else moved, bit for bit
    assert (w_cuda[mask] != base[mask]).float().mean() > 0.9
    # CPU and GPU kernels round differently; Adam's normalised steps amplify that only where a gradient is ~0
    diff = (w_cuda - w_cpu).norm() / (w_cpu - base).norm()
    assert diff < 1e-2, float(diff)
    assert opt_cuda.churn.froze.sum() == pytest.approx(opt_cpu.churn.froze.sum(), rel=0.02, abs=2)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compact_options_on_cuda_match_the_exact_cuda_path(name, exact_cuda):
    base, mask, exact, exact_opt = exact_cuda
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt = SaRAAdamW(unet, **KWARGS, **VARIANTS[name])
    _train_steps(unet, opt, 6)
    w = _flat(unet)
    assert torch.equal(w[~mask], base[~mask])
    assert all(p.grad is None for p in unet.parameters())  # no dense gradient survives
    if opt.moment_generator is not None:
        assert opt.moment_generator.device.type == CUDA.type
    diff = (w - exact).norm() / (exact - base).norm()
    assert diff <= TOLERANCE[opt.moments], (name, float(diff))
    if opt.moments == "fp32":
        assert torch.equal(w, exact) and opt.num_trainable == exact_opt.num_trainable


def test_selected_gradients_accumulate_and_clip_like_dense_masked_ones_on_cuda():
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    ref = copy.deepcopy(unet)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
    for seed in (0, 1):  # gradient accumulation into SaRA's SelectedGrad
        for model in (unet, ref):
            x, t, c = _batch(seed, CUDA)
            model(x, t, c).sample.pow(2).mean().backward()
    assert any(isinstance(p.grad, SelectedGrad) for p in unet.parameters())
    masked = [r.grad.reshape(-1).index_select(0, s.idx.long()) for r, s in zip(ref.parameters(), opt.slots)]
    norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1e-3)  # foreach norm on CUDA
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(torch.cat(masked))), rel=1e-5)
    clipped = torch.cat([s.values.grad for s in opt.slots if s.values.grad is not None])
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("options", [{}, {"compact": True, "moments": "8bit"}])
def test_sparse_file_from_a_cuda_run_rebuilds_the_model_on_cpu_and_cuda(options, tmp_path):
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt = SaRAAdamW(unet, lr=2e-3, fraction=0.1, progressive_iter=2, **options)
    _train_steps(unet, opt, 3)
    assert opt.churn.froze.sum() > 0
    path = save_sparse(opt, tmp_path / "style.safetensors")
    for device in ("cpu", CUDA.type):
        fresh = build_unet(SMALL_CONFIG, seed=0).to(device)
        load_sparse(fresh, path)
        assert torch.equal(_flat(fresh), _flat(unet)), device


@pytest.mark.parametrize("options", [{}, {"compact": True}, {"compact": True, "moments": "8bit"}])
def test_resume_on_cuda_is_exact(options, tmp_path):
    kwargs = dict(lr=3e-3, threshold=3e-3, rank_lambda=1e-2, progressive_iter=3, seed=4, **options)
    a = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt_a = SaRAAdamW(a, **kwargs)
    _train_steps(a, opt_a, 2)
    save_state({"weights": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.safetensors")
    _train_steps(a, opt_a, 3, seed=2)
    ckpt = load_state(tmp_path / "ckpt.safetensors")
    b = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    b.load_state_dict(ckpt["weights"])
    opt_b = SaRAAdamW(b, **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    assert {moment_kind(opt_b.state[s.values]) for s in opt_b.slots if s.count} == {opt_b.moments}
    assert all(t.device.type == CUDA.type for s in opt_b.slots if s.count for t in opt_b.state[s.values].values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    _train_steps(b, opt_b, 3, seed=2)
    assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("method", [SaRA(fraction=0.1), SaRA(fraction=0.1, compact=True), LoRA(rank=4),
                                    FullFineTuning(), SHiRA(r=4)], ids=["sara", "sara-compact", "lora", "full",
                                                                        "shira"])
def test_the_training_loop_on_cuda_with_bf16_autocast(method):
    pipe = TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))
    data = StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=8)
    history = train(pipe, data, method, steps=12, lr=3e-3, batch_size=8, progress=False, seed=0,
                    device=CUDA, mixed_precision="bf16")
    assert history.loss.notna().all() and history.loss.tail(4).mean() < history.loss.head(2).mean()
    if CUDA.type == "cuda":
        assert (history.peak_memory_mb > 0).all()  # the allocator's peak, per step
    assert all(p.device.type == CUDA.type and p.dtype == torch.float32 for p in pipe.unet.parameters())  # fp32 master weights


def test_memory_tracker_on_cuda_counts_sara_below_full_fine_tuning():
    data = StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=4)
    peaks = {}
    for method in (SaRA(fraction=0.1, progressive_iter=None), FullFineTuning()):
        pipe = TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))
        pipe.to(CUDA)
        with MemoryTracker(device=CUDA, model=pipe.unet) as tracker:
            train(pipe, data, method, steps=2, batch_size=4, progress=False, device=CUDA,
                  memory_tracker=tracker)
        peaks[method.name] = tracker.report(pipe.unet).peak_above_frozen
    assert 0 < peaks["sara"] < 0.7 * peaks[FullFineTuning().name]


def test_stable_diffusion_classes_on_cuda_train_save_and_rebuild(tmp_path):
    from sara_edu.sd import generate_sd, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0, device=CUDA)
    base_unet = copy.deepcopy(pipe.unet).cpu()
    data = StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=2)
    method = SaRA(threshold=0.02, rank_lambda=5e-4)
    history = train(pipe, data, method, steps=4, lr=1e-3, batch_size=2, progress=False, device=CUDA,
                    mixed_precision=getattr(pipe, "mixed_precision", "bf16"))
    assert history.loss.notna().all()
    images = generate_sd(pipe, ["a digit 1, cyberpunk style"], steps=3, seed=0)
    path = method.save(tmp_path / "sara.safetensors")
    method.detach()
    rebuilt = pipe.with_unet(load_sparse(copy.deepcopy(base_unet), path).to(CUDA))
    again = generate_sd(rebuilt, ["a digit 1, cyberpunk style"], steps=3, seed=0)
    assert torch.isfinite(images).all() and torch.equal(again, images)


@pytest.mark.parametrize("options", [dict(compiled=True), dict(step_in_backward=True),
                                     dict(step_in_backward=True, compiled=True)],
                         ids=["compiled", "step in backward", "step in backward, compiled"])
def test_compiled_and_per_layer_steps_on_cuda_match_the_exact_cuda_path(options, exact_cuda):
    base, mask, exact, exact_opt = exact_cuda
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt = SaRAAdamW(unet, **KWARGS, **options)
    _train_steps(unet, opt, 6)
    w = _flat(unet)
    assert torch.equal(w[~mask], base[~mask])
    if not options.get("compiled"):  # the stock kernels, one weight at a time: the same numbers
        assert torch.equal(w, exact)
    else:  # Triton's code rounds otherwise than torch's fused CUDA kernel; Adam amplifies it where a gradient is ~0
        diff = (w - exact).norm() / (exact - base).norm()
        assert diff < 1e-2, float(diff)


def test_per_layer_gradients_in_blocks_of_rows_on_cuda_match_the_exact_cuda_path(exact_cuda, monkeypatch):
    from sara_edu.sara import compact_step, row_grad

    monkeypatch.setattr(row_grad, "ROW_BLOCK_BYTES", 512)  # every Linear/Conv2d of the small UNet in blocks
    monkeypatch.setattr(compact_step, "PIECE_ENTRIES", 64)
    base, mask, exact, exact_opt = exact_cuda
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt = SaRAAdamW(unet, **KWARGS, step_in_backward=True)
    assert any(isinstance(m, row_grad.RowBlockConv2d) for m in unet.modules())
    _train_steps(unet, opt, 6)
    w = _flat(unet)
    assert torch.equal(w[~mask], base[~mask])
    # blocks of rows are the same sums from cuBLAS/cuDNN calls of other shapes: rounding-level differences
    diff = (w - exact).norm() / (exact - base).norm()
    assert diff < 1e-2, float(diff)


def test_step_in_backward_on_cuda_peaks_below_the_default_step():
    peaks = {}
    for mode in (False, True):
        unet = build_unet(dict(TINY_UNET_CONFIG, block_out_channels=[64, 128, 128]), seed=0).to(CUDA)
        opt = SaRAAdamW(unet, **KWARGS, step_in_backward=mode)
        _train_steps(unet, opt, 1)
        torch.cuda.synchronize(CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
        before = torch.cuda.memory_allocated(CUDA)
        _train_steps(unet, opt, 2, seed=1)
        peaks[mode] = torch.cuda.max_memory_allocated(CUDA) - before
        del unet, opt
    assert peaks[True] < peaks[False], peaks


# CUDA graphs exist on CUDA only: the CPU dry run of these tests skips them (tests/sara covers their bookkeeping)
GRAPHS = pytest.mark.skipif(CUDA.type != "cuda", reason="CUDA graphs need a CUDA device")


def _graphed_run(options, lr_factor=lambda step: 1.0 if step < 2 else 0.25):
    unet = build_unet(SMALL_CONFIG, seed=0).to(CUDA)
    opt = SaRAAdamW(unet, **{**KWARGS, **options})
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for i in range(6):
        x, t, c = _batch(i, CUDA)
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    return _flat(unet), opt


@GRAPHS
def test_cuda_graphs_replay_the_exact_cuda_step_bit_for_bit():
    # lr a float32 number, and an LR schedule: the graph reads each step's lr from a float32 tensor
    eager, _ = _graphed_run(dict(lr=2.0**-9))
    graphed, opt = _graphed_run(dict(lr=2.0**-9, cuda_graphs=True))
    assert torch.equal(graphed, eager)
    # step 1 eager (no AdamW state yet), one graph before progressive adjustment (step 3), one after
    assert opt.graph_stats == {"captures": 2, "replays": 5, "eager": 1}


@GRAPHS
def test_cuda_graphs_with_any_lr_round_only_the_lr():
    base = _flat(build_unet(SMALL_CONFIG, seed=0))
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / 6))  # noqa: E731
    eager, _ = _graphed_run(dict(lr=1e-3), cosine)
    graphed, _ = _graphed_run(dict(lr=1e-3, cuda_graphs=True), cosine)
    diff = (graphed - eager).norm() / (eager - base).norm()
    assert diff < 1e-4, float(diff)


@GRAPHS
def test_cuda_graphs_through_the_course_loop():
    from sara_edu.sd import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0, device=CUDA)
    data = StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=2)
    method = SaRA(threshold=0.02, rank_lambda=5e-4, cuda_graphs=True)
    history = train(pipe, data, method, steps=6, lr=1e-3, batch_size=2, progress=False, device=CUDA,
                    mixed_precision="bf16")
    assert history.loss.notna().all()
    stats = method.optimizer.graph_stats
    assert stats["replays"] >= 4 and stats["captures"] <= 2, stats
