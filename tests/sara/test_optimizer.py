import copy
import os

import pytest
import torch
from torch import nn

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.io import save_tensors
from sara_edu.sara.attach import detach, merge
from sara_edu.sara.grad import SelectedGrad
from sara_edu.sara.nuclear import nuclear_norm_grad, nuclear_norm_penalty
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.sparse_file import _fingerprint, load_sparse, save_sparse
from sara_edu.training.loop import train
from sara_edu.training.sara import SaRA
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 16, 16, generator=g).to(dtype), torch.tensor([10, 700]),
            torch.randn(2, 4, 32, generator=g).to(dtype))


def _loss(unet, batch):
    x, t, c = batch
    return unet(x, t, c).sample.pow(2).mean()


def _train_steps(unet, opt, n, seed=0):
    for i in range(n):
        _loss(unet, _batch(next(unet.parameters()).dtype, seed + i)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------- correctness of the sparse update


def test_matches_dense_adamw_with_masked_gradient_and_leaves_the_rest_untouched():
    """Several steps, weight decay on: selected entries follow dense AdamW on a masked grad;
    every other entry stays bit-for-bit the same; no dense grad survives a backward."""
    unet = build_unet(SMALL_CONFIG, seed=0).double()
    ref = copy.deepcopy(unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1, rank_lambda=0, weight_decay=0.1)
    masks = {n: opt.selection.mask(n) for n in opt.selection.names}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        batch = _batch(torch.float64, step)
        _loss(unet, batch).backward()
        # dense grads freed by the hooks: a trained weight keeps only its selected entries
        assert all(p.grad is None or (isinstance(p.grad, SelectedGrad) and p.grad.values is s.values.grad)
                   for p, s in zip(unet.parameters(), opt.slots))
        _loss(ref, batch).backward()
        for slot in opt.slots:  # the gathered grad is the dense grad at the mask
            if slot.idx.numel():
                ref_grad = dict(ref.named_parameters())[slot.name].grad.reshape(-1)[slot.idx.long()]
                torch.testing.assert_close(slot.values.grad, ref_grad, rtol=0, atol=1e-12)
        for n, p in ref.named_parameters():
            p.grad.mul_(masks[n])
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the reference's decay also hits unselected entries: put them back
            for n, p in ref.named_parameters():
                p[~masks[n]] = base[n][~masks[n]]
    changed = 0
    for n, p in unet.named_parameters():
        m = masks[n]
        assert torch.equal(p[~m], base[n][~m]), n
        torch.testing.assert_close(p[m], dict(ref.named_parameters())[n][m], rtol=0, atol=1e-9)
        changed += int((p[m] != base[n][m]).sum())
    assert changed > 0.9 * opt.selection.total_selected


def test_float32_matches_dense_reference_to_1e6_and_untouched_entries_are_bitwise_with_all_features():
    unet = build_unet(seed=0)
    ref = copy.deepcopy(unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0, weight_decay=1e-2)
    masks = {n: opt.selection.mask(n) for n in opt.selection.names}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)  # same kernel
    for step in range(3):
        batch = _batch(seed=step)
        for model, o in ((unet, opt), (ref, ref_opt)):
            _loss(model, batch).backward()
            if model is ref:
                for n, p in ref.named_parameters():
                    p.grad.mul_(masks[n])
            o.step()
            o.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p[~masks[n]] = base[n][~masks[n]]
    for n, p in unet.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[n], rtol=0, atol=1e-6)

    # nuclear norm + progressive adjustment on: still only selected entries ever move
    unet2 = build_unet(seed=0)
    opt2 = SaRAAdamW(unet2, lr=2e-2, fraction=0.1, rank_lambda=1.0, progressive_iter=2, weight_decay=0.5)
    masks2 = {n: opt2.selection.mask(n) for n in opt2.selection.names}
    _train_steps(unet2, opt2, 4)
    assert opt2.churn is not None
    for n, p in unet2.named_parameters():
        assert torch.equal(p[~masks2[n]], base[n][~masks2[n]]), n


def test_gradient_accumulation_and_lr_scheduler():
    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
    ref = copy.deepcopy(unet)
    ref.requires_grad_(True)
    for s in range(2):
        _loss(unet, _batch(seed=s)).backward()
        _loss(ref, _batch(seed=s)).backward()
    slot = next(s for s in opt.slots if s.idx.numel() > 100)
    dense = dict(ref.named_parameters())[slot.name].grad.reshape(-1)[slot.idx.long()]
    torch.testing.assert_close(slot.values.grad, dense, rtol=1e-5, atol=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None], 1.0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_bf16_autocast_keeps_fp32_weights():
    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1)
    x, t, c = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, c).sample
    out.float().pow(2).mean().backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(s.values.dtype == torch.float32 for s in opt.slots)


# ----------------------------------------------------------------- progressive adjustment


def test_progressive_adjustment_freezes_entries_that_crossed_the_threshold():
    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=3e-3, threshold=3e-3, rank_lambda=0, weight_decay=0.0)
    _train_steps(unet, opt, 3)  # lr ~ θ: many entries cross θ, others do not
    before = {s.name: (s.idx.clone(), s.values.detach().clone(), opt.state[s.values]["exp_avg"].clone())
              for s in opt.slots if s.idx.numel()}
    churn = opt.progressive_adjust()
    total = churn.iloc[-1]
    assert total["name"] == "TOTAL" and total.froze > 0 and total["continue"] > 0
    assert total.froze + total["continue"] == total.selected == sum(len(v[0]) for v in before.values())
    frozen_pos = {}
    for slot in opt.slots:
        if slot.name not in before:
            continue
        idx, vals, m = before[slot.name]
        keep = vals.abs() < 3e-3
        assert torch.equal(slot.idx, idx[keep])
        # moments of continuing entries are kept, frozen ones dropped
        if keep.any():
            assert torch.equal(opt.state[slot.values]["exp_avg"], m[keep])
        frozen_pos[slot.name] = idx[~keep]
        row = churn[churn.name == slot.name].iloc[0]
        assert row.froze == int((~keep).sum()) and row["continue"] == int(keep.sum())
    snapshot = {n: p.detach().clone() for n, p in unet.named_parameters()}
    _train_steps(unet, opt, 2, seed=10)
    moved = 0
    for slot in opt.slots:
        if slot.name in frozen_pos:
            w = slot.param.detach().reshape(-1)
            old = snapshot[slot.name].reshape(-1)
            assert torch.equal(w[frozen_pos[slot.name].long()], old[frozen_pos[slot.name].long()])
            moved += int((w[slot.idx.long()] != old[slot.idx.long()]).sum())
    assert moved > 0
    assert opt.num_trainable == total["continue"]
    # the sparse file still holds every entry that ever trained
    assert sum(v.numel() for v in opt.trained_entries().values()) == total.selected


def test_progressive_adjustment_runs_at_progressive_iter():
    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=3e-3, threshold=3e-3, rank_lambda=0, progressive_iter=2)
    _train_steps(unet, opt, 1)
    assert opt.churn is None
    _train_steps(unet, opt, 1)
    assert opt.churn is not None and opt.churn.iloc[-1].froze > 0


# ----------------------------------------------------------------- nuclear norm


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (6, 6)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_nuclear_gradient_matches_autograd(shape, method):
    D = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    D.requires_grad_(True)
    torch.linalg.matrix_norm(D, "nuc").backward()
    G, value = nuclear_norm_grad(D.detach(), method)
    torch.testing.assert_close(G, D.grad, rtol=0, atol=1e-8)
    assert value == pytest.approx(torch.linalg.matrix_norm(D.detach(), "nuc").item(), rel=1e-10)
    G0, v0 = nuclear_norm_grad(torch.zeros(*shape))
    assert v0 == 0 and not G0.any()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_default_nuclear_gradient_keeps_small_singular_values_of_float32_matrices(shape):
    """σ from σ_max down to 1e-6·σ_max: every direction counts (a Gram matrix in float32 dropped σ < 3.5e-4·σ_max)."""
    g = torch.Generator().manual_seed(3)
    k = min(shape)
    U = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64, generator=g))[0]
    D = ((U * torch.logspace(0, -6, k, dtype=torch.float64)) @ V.T).float()
    reference = D.double().requires_grad_(True)  # autograd of the float32 matrix's nuclear norm, in float64
    torch.linalg.matrix_norm(reference, "nuc").backward()
    G, value = nuclear_norm_grad(D)
    assert G.dtype == torch.float32
    assert float((G.double() - reference.grad).norm() / reference.grad.norm()) < 1e-4
    assert value == pytest.approx(torch.linalg.matrix_norm(D.double(), "nuc").item(), rel=1e-6)


def test_nuclear_gradient_falls_back_to_the_svd_where_the_eigensolver_fails(monkeypatch):
    """cuSOLVER's eigh failed to converge on an H100 early in a run (ΔW tiny and mostly zero): a step must not."""
    D = torch.zeros(40, 12)
    D[::3, ::4] = 1e-5 * torch.randn(14, 3, generator=torch.Generator().manual_seed(2))
    expected = nuclear_norm_grad(D, "svd")

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (error code: 1255).")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    G, value = nuclear_norm_grad(D, "gram")
    assert torch.equal(G, expected[0]) and value == expected[1] > 0


def test_optimizer_adds_lambda_times_nuclear_gradient_at_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Linear(9, 4, bias=False)).double()
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5, rank_lambda=0.3, seed=0)
    with torch.no_grad():
        for s in opt.slots:
            s.values.add_(torch.randn_like(s.values) * 0.1)
    opt._add_nuclear_grad()
    slot = next(s for s in opt.slots if s.name == opt.last_nuclear["name"])
    dense = torch.zeros(slot.param.numel(), dtype=torch.float64)
    dense[slot.idx.long()] = slot.values.detach() - slot.initial
    D = dense.view(slot.param.shape).requires_grad_(True)
    torch.linalg.matrix_norm(D, "nuc").backward()
    torch.testing.assert_close(slot.values.grad, 0.3 * D.grad.reshape(-1)[slot.idx.long()], rtol=0, atol=1e-9)
    assert opt.last_nuclear["penalty"] == pytest.approx(0.3 * torch.linalg.matrix_norm(D.detach(), "nuc").item())
    assert nuclear_norm_penalty(D.detach(), 0.3) == pytest.approx(opt.last_nuclear["penalty"])
    per_layer = nuclear_norm_penalty(opt, per_layer=True)
    assert set(per_layer.name) == {"0.weight", "1.weight"}  # biases are not matrices
    assert nuclear_norm_penalty(opt) == pytest.approx(per_layer.penalty.sum())


def test_nuclear_choice_is_seeded_and_every_k_steps():
    def chosen(seed, every):
        unet = build_unet(seed=0)
        opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=1e-3, seed=seed, nuclear_every=every)
        names = []
        for i in range(4):
            _loss(unet, _batch(seed=i)).backward()
            opt.last_nuclear = None
            opt.step()
            opt.zero_grad()
            names.append(opt.last_nuclear and opt.last_nuclear["name"])
        return names

    a, b = chosen(0, 1), chosen(0, 1)
    assert a == b and all(a)
    sparse = chosen(0, 2)
    assert sparse[1] is None and sparse[3] is None and sparse[0] and sparse[2]


# ----------------------------------------------------------------- files, merging, attaching


def test_save_load_round_trip_size_and_mismatches(tmp_path):
    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1)
    _train_steps(unet, opt, 2)
    x = _batch(seed=99)
    with torch.no_grad():
        expected = unet(*x).sample
    path = save_sparse(opt, tmp_path / "style.safetensors", metadata={"style": "ink"})
    full = save_tensors(unet.state_dict(), tmp_path / "full.safetensors")
    ratio = os.path.getsize(path) / os.path.getsize(full)
    assert ratio < 0.25, ratio  # int32 positions + fp32 values for 10% ≈ 0.2x (+ metadata)

    fresh = build_unet(seed=0)
    with torch.no_grad():
        assert not torch.equal(fresh(*x).sample, expected)
        load_sparse(fresh, path)
        assert torch.equal(fresh(*x).sample, expected)
    with pytest.raises(CheckpointError, match="different base weights"):
        load_sparse(build_unet(seed=1), path)
    with pytest.raises(CheckpointError, match="different model"):
        load_sparse(build_unet(SMALL_CONFIG, seed=0), path)
    with pytest.raises(CheckpointError, match="not a sara-edu sparse file"):
        load_sparse(build_unet(seed=0), full)
    with pytest.raises(ConfigError, match="detach"):
        load_sparse(unet, path)  # SaRA is still attached to it


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    import sara_edu.io as io

    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1)

    def boom(tensors, tmp, metadata=None):
        open(tmp, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_sparse(opt, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_detach_leaves_a_plain_model_with_the_same_outputs():
    unet = build_unet(seed=0)
    unet.conv_in.requires_grad_(False)  # a user's choice, restored on detach
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    modules = [n for n, _ in unet.named_modules()]
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1)
    assert unet.__dict__.get("sara_edu_attached") == "SaRAAdamW"
    _train_steps(unet, opt, 2)
    x = _batch(seed=5)
    with torch.no_grad():
        expected = unet(*x).sample
    model = merge(opt)
    assert model is unet
    for n, p in unet.named_parameters():
        assert not p._post_accumulate_grad_hooks, n
        assert not hasattr(p, "_sara_edu_owner")
        assert p.requires_grad == flags[n]
    assert "sara_edu_attached" not in unet.__dict__
    assert [n for n, _ in unet.named_modules()] == modules
    with torch.no_grad():
        assert torch.equal(unet(*x).sample, expected)
    _loss(unet, x).backward()  # plain autograd again: dense grads stay
    assert unet.conv_out.weight.grad is not None
    with pytest.raises(ConfigError, match="detached"):
        opt.step()
    detach(unet, requires_grad=False)  # nothing attached: harmless, sets flags
    assert not any(p.requires_grad for p in unet.parameters())


def test_reattaching_or_attaching_after_lora_is_an_error():
    from peft import LoraConfig

    unet = build_unet(seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1)
    with pytest.raises(ConfigError, match="already attached"):
        SaRAAdamW(unet, lr=1e-3, fraction=0.1)
    with pytest.raises(ConfigError, match="already attached"):
        SaRAAdamW(unet.down_blocks[1], lr=1e-3, fraction=0.1)  # a part of it counts too
    detach(unet)
    assert opt.detached
    SaRAAdamW(unet, lr=1e-3, fraction=0.1)  # fine once detached

    lora = build_unet(seed=0)
    lora.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ConfigError, match="LoRA"):
        SaRAAdamW(lora, lr=1e-3, fraction=0.1)


def test_state_dict_resumes_exactly(tmp_path):
    kwargs = dict(lr=3e-3, threshold=3e-3, rank_lambda=1e-2, progressive_iter=3, seed=4)
    a = build_unet(seed=0)
    opt_a = SaRAAdamW(a, **kwargs)
    _train_steps(a, opt_a, 2)
    torch.save({"weights": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    _train_steps(a, opt_a, 3, seed=2)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    b = build_unet(seed=0)
    b.load_state_dict(ckpt["weights"])
    opt_b = SaRAAdamW(b, **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    _train_steps(b, opt_b, 3, seed=2)
    assert opt_b.churn is not None
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("kwargs, msg", [
    ({"lr": 0}, "lr"), ({"rank_lambda": -1}, "rank_lambda"), ({"nuclear_every": 0}, "nuclear_every"),
    ({"threshold": 1e-3, "fraction": 0.1}, "not both"), ({"threshold": -2e-3}, "positive"),
    ({"fraction": 1.2}, "between 0 and 1"), ({"progressive_iter": 10, "total_steps": 10}, "beyond the run"),
    ({"progressive_iter": 0}, "progressive_iter"), ({"weight_decay": -1}, "weight_decay"),
    ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\).*\(0\.9,\)"), ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": 0.9}, "betas"), ({"betas": (0.9, "0.999")}, "betas"), ({"betas": (-0.1, 0.999)}, "betas"),
    ({"eps": 0}, "eps must be a finite number > 0"), ({"eps": -1e-8}, "eps"), ({"eps": float("nan")}, "eps"),
])
def test_bad_optimizer_arguments(kwargs, msg):
    unet = build_unet(seed=0)
    with pytest.raises(ConfigError, match=msg):
        SaRAAdamW(unet, **kwargs)
    assert not hasattr(unet.conv_in.weight, "_sara_edu_owner")  # a failed attach leaves the model alone


# ----------------------------------------------------------------- with the course's training loop


def test_train_loop_with_sara_lowers_the_loss(tiny_pipe, tmp_path):
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    method = SaRA(fraction=0.2)
    ds = StyleDataset(None, digits=[0, 1], limit_per_digit=16)
    h = train(tiny_pipe, ds, method, steps=20, lr=1e-2, batch_size=8, progress=False, seed=0)
    assert h.loss.tail(8).mean() < 0.7 * h.loss.head(3).mean()
    report = method.report()
    assert report.iloc[-1].selected == method.optimizer.selection.total_selected
    churn = method.churn
    assert churn is not None and churn.iloc[-1].selected == report.iloc[-1].selected  # adjusted at step 10
    assert method.trainable_parameters(tiny_pipe.unet) == churn.iloc[-1]["continue"]
    masks = {n: method.optimizer.selection.mask(n) for n in report.name[:-1]}
    for n, p in tiny_pipe.unet.named_parameters():
        assert torch.equal(p[~masks[n]], base[n][~masks[n]]), n
    path = method.save(tmp_path / "sara.safetensors")
    assert path.exists()
    with pytest.raises(ConfigError, match="beyond the run"):
        SaRA(progressive_iter=50).build_optimizer(build_unet(seed=0), lr=1e-3, weight_decay=0.0, total_steps=50)
    # a second run with the same method object re-attaches cleanly
    train(tiny_pipe, ds, method, steps=2, lr=1e-3, batch_size=4, progress=False)


def test_step_hooks_run_once_per_step():
    torch.optim.AdamW(nn.Linear(2, 2).parameters())  # torch wraps AdamW.step once an instance exists
    model = nn.Linear(10, 10)
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_files_work_for_weights_beyond_2_to_the_24(tmp_path):
    """Positions above 2**24 are not exact in float32: nothing may go through a float."""
    model = nn.Module()
    model.big = nn.Parameter(torch.randn(2**25 + 9, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.big[-9:] = 1e-6  # selected, at positions a float32 cannot count to
    fresh = copy.deepcopy(model)
    opt = SaRAAdamW(model, lr=1e-2, fraction=0.05, rank_lambda=0)
    assert int(opt.slots[0].idx[-1]) > 2**25
    model.big.sum().backward()
    opt.step()
    path = save_sparse(opt, tmp_path / "big.safetensors")
    detach(opt)
    load_sparse(fresh, path)
    assert torch.equal(fresh.big, model.big)
    # the case an SD1.5 run hit: float32(24437051) rounds up to 24437052, one past the end
    _fingerprint(torch.zeros(24_437_052), torch.zeros(0, dtype=torch.long))


def test_works_on_an_sd3_style_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.1, rank_lambda=1e-2, target_modules=["attn", "ff"])
    out = model(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                pooled_projections=torch.randn(2, 8), timestep=torch.tensor([1.0, 500.0])).sample
    out.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(("attn" in n or "ff" in n) for n in changed)
    moved = sum(int((p != base[n]).sum()) for n, p in model.named_parameters())
    assert 0.9 * opt.selection.total_selected <= moved <= opt.selection.total_selected


def test_progressive_adjustment_keeps_no_second_copy_of_the_first_positions():
    import gc
    import weakref

    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1, progressive_iter=2)
    first = {n: weakref.ref(t) for n, t in opt.selection.indices.items()}
    before = {n: t.clone() for n, t in opt.selection.indices.items()}
    _train_steps(unet, opt, 2)
    assert int(opt.churn.froze.iloc[-1]) > 0  # some entries froze: every trained weight got new positions
    gc.collect()
    changed = [s.name for s in opt.slots if s.frozen]
    assert changed and all(first[n]() is None for n in changed)  # the first positions are freed
    # and the selection still names every position that ever trained
    assert all(torch.equal(opt.selection.indices[n].long(), before[n].long()) for n in before)
    assert opt.selection.total_selected == sum(t.numel() for t in before.values())


@pytest.mark.parametrize("shape", [(3000, 200), (200, 3000), (1, 40), (40, 1), (300, 300)])
def test_the_nuclear_gradient_read_at_the_positions_is_the_dense_one_there_with_small_transients(shape, monkeypatch):
    from sara_edu.measure.memory import MemoryTracker
    from sara_edu.sara import nuclear

    monkeypatch.setattr(nuclear, "NUCLEAR_PIECE_ROWS", 64)  # many pieces, one of them partial
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < 0.1
    delta = torch.randn(shape, generator=g) * mask
    positions = mask.reshape(-1).nonzero().reshape(-1).to(torch.int32)
    G, value = nuclear.nuclear_norm_grad(delta)
    with MemoryTracker() as tracker:
        at, value_at = nuclear.nuclear_norm_grad_at(delta, positions)
    torch.testing.assert_close(at, G.reshape(-1)[positions.long()], rtol=1e-6, atol=1e-7)
    assert value_at == pytest.approx(value, rel=1e-12)
    if min(shape) > 1:  # no float64 copy of delta, nor U·Vᵀ in full: the small side's n×n matrices and pieces
        n = min(shape)
        assert tracker.tensor_peak_bytes < 0.6 * delta.numel() * 8 + 6 * n * n * 8, tracker.tensor_peak_bytes
        if max(shape) >= 4 * n:  # where the n×n matrices are small, forming it in full costs more than the bound
            with MemoryTracker() as dense:
                nuclear.nuclear_norm_grad(delta)
            assert dense.tensor_peak_bytes > 0.6 * delta.numel() * 8 + 6 * n * n * 8
