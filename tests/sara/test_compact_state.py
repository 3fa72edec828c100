"""SaRA's compact state options: no value copy, compact positions, low-precision moments."""
import sys

import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.io import load_state, save_state
from sara_edu.sara import compact_step
from sara_edu.sara.footprint import state_bytes
from sara_edu.sara.moments import (
    _FP8,
    BLOCK,
    _dequantize,
    _quantize,
    convert_moments,
    group_layout,
    group_views,
    init_moments,
    keep_entries,
    load_moments,
    load_moments_group,
    moment_kind,
    moment_tensors,
    store_moments,
    store_moments_group,
)
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.positions import encode_positions
from sara_edu.sara.sparse_file import load_sparse, save_sparse
from sara_edu.training.loop import train
from sara_edu.training.sara import SaRA
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)

VARIANTS = {
    "no value copy": dict(value_copy=False),
    "delta positions": dict(positions="delta"),
    "bitmask positions": dict(positions="bitmask"),
    "bf16 moments": dict(moments="bf16"),
    "8-bit moments": dict(moments="8bit"),
    "compact": dict(compact=True),
    "compact, 8-bit": dict(compact=True, moments="8bit"),
}
# Documented tolerance: relative Frobenius difference from the exact path of the update after 6 steps
# on the small model (measured: bf16 ~0.2%, 8 bits ~3%; same numbers for the other options).
TOLERANCE = {"bf16": 0.01, "8bit": 0.08, "fp32": 0.0}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 4, 32, generator=g)


def _train_steps(unet, opt, n, seed=0):
    for i in range(n):
        x, t, c = _batch(seed + i)
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------- positions


@pytest.mark.parametrize("kind", ["index", "bitmask", "delta"])
@pytest.mark.parametrize("numel, density", [(5000, 0.1), (300_000, 0.002), (300_000, 5e-5), (4000, 0.7), (16, 0.0)])
def test_positions_round_trip(kind, numel, density):
    g = torch.Generator().manual_seed(numel)
    idx = torch.nonzero(torch.rand(numel, generator=g) < density).view(-1).to(torch.int32)
    enc = encode_positions(idx, numel, kind)
    assert enc.count == idx.numel()
    out = enc.decode()
    assert out.dtype == torch.int32 and torch.equal(out, idx)
    wide = enc.decode(torch.int64)  # straight to int64, as the compact step decodes them
    assert wide.dtype == torch.int64 and torch.equal(wide, idx.long())


def test_delta_positions_cost_about_one_byte_and_escape_long_gaps():
    numel = 200_000
    g = torch.Generator().manual_seed(0)
    idx = torch.nonzero(torch.rand(numel, generator=g) < 0.1).view(-1).to(torch.int32)
    enc = encode_positions(idx, numel, "delta")
    assert enc.codes.dtype == torch.uint8 and enc.escapes == 0 and enc.codes.numel() == idx.numel()
    assert encode_positions(idx, numel, "bitmask").codes.numel() == numel // 8
    # long gaps: escapes in one byte, or two-byte codes when those are smaller
    gappy = torch.cat([torch.arange(100), torch.tensor([700, 701, 1600])]).to(torch.int32)
    enc = encode_positions(gappy, 2000, "delta")  # gaps 601 and 899: 2 + 3 escape codes
    assert enc.codes.dtype == torch.uint8 and enc.escapes == 5 and torch.equal(enc.decode(), gappy)
    sparse = torch.arange(0, 1_400_000, 70_000, dtype=torch.int32)
    enc = encode_positions(sparse, 1_400_000, "delta")
    assert enc.codes.dtype == torch.int16 and torch.equal(enc.decode(), sparse)
    # the largest one-byte code without an escape (254, a gap of 255): code + 1 must not wrap in uint8
    widest = torch.arange(254, 255 * 300, 255, dtype=torch.int32)
    enc = encode_positions(widest, 255 * 300, "delta")
    assert enc.escapes == 0 and int(enc.codes.max()) == 254
    for dtype in (torch.int32, torch.int64):
        assert torch.equal(enc.decode(dtype), widest.to(dtype))


# ----------------------------------------------------------------- moments


def test_bf16_stochastic_rounding_lets_v_decay_where_nearest_rounding_freezes_it():
    gen = torch.Generator().manual_seed(0)
    v0 = torch.full((20_000,), 1.0)
    state, nearest = {}, v0.to(torch.bfloat16)
    store_moments(state, "bf16", torch.zeros_like(v0), v0, gen)
    for _ in range(200):  # no gradient: v should decay by 0.999 per step
        m, v = load_moments(state)
        store_moments(state, "bf16", m, v.mul_(0.999), gen)
        nearest = (nearest.float() * 0.999).to(torch.bfloat16)
    assert torch.all(nearest == 1.0)  # 0.1% is below half a bf16 step: stuck for ever
    mean = load_moments(state)[1].mean().item()
    assert abs(mean - 0.999**200) < 2e-3, mean


def test_8bit_moments_are_blockwise_and_keep_small_v_nonzero():
    g = torch.Generator().manual_seed(0)
    n = 3 * BLOCK + 17  # a partial last block
    scale = torch.logspace(-6, 0, n)[torch.randperm(n, generator=g)]
    m = torch.randn(n, generator=g) * scale
    v = (m * m) + 1e-30
    v[5] = 0.0
    state = {}
    store_moments(state, "8bit", m, v, None)
    assert moment_kind(state) == "8bit"
    assert state["exp_avg"].element_size() == 1 and state["exp_avg_scale"].numel() == 4
    m2, v2 = load_moments(state)
    # within 1/16 relative for entries within 1e-3 of their block's largest (e4m3: 3 significant bits)
    big = m.abs() >= 1e-3 * torch.repeat_interleave(state["exp_avg_scale"], BLOCK)[:n]
    assert ((m2 - m).abs() <= m.abs() / 16 + 1e-12)[big].all()
    assert (v2 > 0).all()  # never m/eps: v is kept at least at the smallest float8 of its block
    assert v2[5] <= 2**-9 / 448 * state["exp_avg_sq_scale"][0]
    keep = torch.rand(n, generator=g) < 0.5
    keep_entries(state, keep)
    m3, _ = load_moments(state)
    assert m3.numel() == int(keep.sum()) and state["exp_avg_scale"].numel() == -(-int(keep.sum()) // BLOCK)
    torch.testing.assert_close(m3, m[keep], rtol=1 / 8, atol=1e-3 * scale.max().item())
    convert_moments(state, "fp32")
    assert moment_kind(state) == "fp32" and "exp_avg_scale" not in state


def _awkward_floats(n, seed=0):
    """Signed values over fp32's whole range, subnormals, zeros and infinities included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-45, 38, n)[torch.randperm(n, generator=g)]
    x[:10] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 1e-39, -1e-39, 3.4e38, -3.4e38])
    return x


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("n", [3 * 65_536 + 1000, 2 * BLOCK + 100])  # more than one table of random numbers
def test_the_fast_encodings_equal_the_plain_casts_bit_for_bit(n):
    """bf16 and float8 moments are written by converting copies and bit views; these are the plain casts."""
    m, v = _awkward_floats(n), _awkward_floats(n, seed=1).abs()
    m[BLOCK: 2 * BLOCK] = -0.0  # blocks of zeros: their scale must be +0.0
    m[n - n % BLOCK:] = -0.0
    for kind in ("bf16", "8bit"):
        for fresh in (True, False):  # stored anew, and converted into the tensors of an earlier step
            state = {}
            if not fresh:
                store_moments(state, kind, torch.zeros(n), torch.zeros(n), None)
            store_moments(state, kind, m, v, torch.Generator().manual_seed(3))
            gen = torch.Generator().manual_seed(3)
            if kind == "bf16":  # m to nearest; v: random bits below the kept 16, truncated, then cast
                want_m = m.to(torch.bfloat16)
                table = torch.randint(0, 1 << 16, (65_536,), dtype=torch.int32, generator=gen)
                noisy = v.view(torch.int32) + table.repeat(n // 65_536 + 1)[:n]
                want_v = noisy.bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)
            else:  # float8 codes: the plain cast of the scaled (and for v stochastically rounded) values
                want_m = _quantize(m, None, False)[0].to(_FP8)
                want_v = _quantize(v, gen, True)[0].to(_FP8)
                for key, x in (("exp_avg_scale", m), ("exp_avg_sq_scale", v)):  # each block's largest |x|
                    padded = torch.zeros(-(-n // BLOCK) * BLOCK)
                    padded[:n] = x.abs()
                    assert torch.equal(_bits(state[key]), _bits(padded.view(-1, BLOCK).amax(1))), key
            for key, want in (("exp_avg", want_m), ("exp_avg_sq", want_v)):
                got = state[key]
                assert got.dtype == want.dtype and got.is_contiguous() and got.untyped_storage().nbytes() == \
                    n * got.element_size()
                assert torch.equal(_bits(got), _bits(want)), (kind, fresh, key)


def test_8bit_decoding_equals_the_float8_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(_FP8)  # 0x7F and 0xFF are NaN: decoded, not produced
    scales = torch.tensor([3.7])
    want = codes.float() * (scales / 448.0)
    assert torch.equal(_bits(_dequantize(codes, scales)), _bits(want))
    blocks = codes.repeat(3)[:600]  # two full blocks and a tail, each with its scale
    scales = torch.tensor([1e-30, 2.5, 7e30])
    want = blocks.float() * torch.repeat_interleave(scales / 448.0, BLOCK)[:600]
    assert torch.equal(_bits(_dequantize(blocks, scales)), _bits(want))
    # encoding never produces a NaN code, whatever the values (clamped to +-448 of the block's largest first)
    x = _awkward_floats(5000)
    x = x[x.isfinite()]
    for floor, values in ((False, x), (True, x.abs())):
        normed, _ = _quantize(values, torch.Generator().manual_seed(0), floor)
        assert not normed.to(_FP8).float().isnan().any()


@pytest.mark.skipif(sys.byteorder != "little", reason="checks the little-endian layout")
def test_bf16_is_the_high_half_of_fp32_on_this_machine():
    x = _awkward_floats(1000)
    truncated = (x.view(torch.int32) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(_bits(x.view(torch.bfloat16)[1::2]), _bits(truncated))


# ----------------------------------------------------------------- the options in the optimizer


EXACT_KWARGS = dict(lr=2e-3, fraction=0.1, rank_lambda=1e-2, progressive_iter=3, weight_decay=0.1)


@pytest.fixture(scope="module")
def exact_run():
    """(base weights, selection mask, weights after 6 exact steps, trainable count at the end), once."""
    exact = build_unet(SMALL_CONFIG, seed=0)
    base = _flat(exact).clone()
    opt = SaRAAdamW(exact, **EXACT_KWARGS)
    mask = torch.cat([opt.selection.mask(n).reshape(-1) for n in opt.selection.names])
    _train_steps(exact, opt, 6)
    return base, mask, _flat(exact), opt.num_trainable


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_option_trains_only_selected_entries_within_its_tolerance(name, exact_run):
    base, mask, exact, exact_trainable = exact_run
    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, **EXACT_KWARGS, **VARIANTS[name])
    _train_steps(unet, opt, 6)
    w = _flat(unet)
    assert torch.equal(w[~mask], base[~mask])  # only selected entries ever move
    assert (w[mask] != base[mask]).float().mean() > 0.9
    assert all(p.grad is None for p in unet.parameters())  # no dense gradient survives
    assert opt.churn is not None and opt.churn.iloc[-1].froze > 0
    diff = (w - exact).norm() / (exact - base).norm()
    assert diff <= TOLERANCE[opt.moments], (name, float(diff))
    if opt.moments == "fp32":  # the compact step runs the exact path's (fused) kernel: bit for bit the same
        assert torch.equal(w, exact) and opt.num_trainable == exact_trainable


# how many entries make a group of small weights updated together: 0 = none (each weight alone), the
# default (CPU_CHUNK), or every weight in groups as large as a GPU's
GROUPINGS = {"no groups": 0, "default groups": None, "GPU-sized groups": 1 << 30}


@pytest.mark.parametrize("fused", [None, False])  # the default (fused on a CPU) and torch's single-tensor formula
# layers in one chunk, or cut into many (as big layers are). Chunks apply only to weights updated alone: every
# weight of the small model has under CPU_CHUNK trained entries, so with groups on, every one is grouped.
@pytest.mark.parametrize("grouping, chunk", [("no groups", None), ("no groups", 64), ("default groups", None),
                                             ("GPU-sized groups", None)])
def test_compact_options_with_fp32_moments_equal_the_exact_path_with_the_same_kernel(fused, chunk, grouping,
                                                                                     monkeypatch):
    if chunk:
        monkeypatch.setattr(compact_step, "CPU_CHUNK", chunk)
    if GROUPINGS[grouping] is not None:
        monkeypatch.setitem(compact_step.GROUP_ENTRIES, "cpu", GROUPINGS[grouping])
    kwargs = dict(EXACT_KWARGS, fused=fused)
    runs = {}
    for name, options in (("exact", {}), ("no copy", {"value_copy": False}),
                          ("no copy, delta", {"value_copy": False, "positions": "delta"}),
                          ("copy, through the compact step", {"moments": "fp32", "value_copy": True})):
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, **kwargs, **options)
        assert bool(opt.defaults["fused"]) == (fused is None)
        if grouping == "default groups":  # why chunks need not be crossed with groups (see the parametrization)
            assert max(s.count for s in opt.slots) < compact_step.GROUP_ENTRIES["cpu"]
        if name == "copy, through the compact step":  # the exact options, but the compact step
            opt._own_step = True
        _train_steps(unet, opt, 5)
        runs[name] = _flat(unet)
    for name, w in runs.items():
        assert torch.equal(w, runs["exact"]), name


@pytest.mark.parametrize("kind", ["bf16", "8bit"])
def test_a_group_of_params_encodes_its_moments_as_each_param_alone_would(kind):
    """Nearest rounding: the same stored bits, blocks included, whether params are encoded together or alone."""
    g = torch.Generator().manual_seed(3)
    counts = [5, BLOCK, 3 * BLOCK + 17, 1]  # tails of every length: the padding keeps each param's blocks its own
    ms = [torch.randn(n, generator=g) * 10.0 ** -torch.randint(1, 6, (1,), generator=g).item() for n in counts]
    vs = [m.square() for m in ms]
    alone = [{} for _ in counts]
    for st, m, v in zip(alone, ms, vs):
        store_moments(st, kind, m, v, None)
    together = [{} for _ in counts]
    for st, n in zip(together, counts):
        init_moments(st, n, kind, "cpu")
    sizes = group_layout(counts, kind)
    m_buf, v_buf = torch.zeros(sum(sizes)), torch.zeros(sum(sizes))
    for buf, xs in ((m_buf, ms), (v_buf, vs)):
        for view, x in zip(group_views(buf, counts, sizes), xs):
            view.copy_(x)
    store_moments_group(together, kind, m_buf, v_buf, counts, None)
    for a, b in zip(alone, together):
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                            if a[k].dtype == torch.float8_e4m3fn else torch.equal(a[k], b[k])
                                            for k in a)
    m2, v2, m_views, v_views = load_moments_group(together, counts, "cpu")
    for st, m_i, v_i in zip(alone, m_views, v_views):
        m_ref, v_ref = load_moments(st)
        assert torch.equal(m_i, m_ref) and torch.equal(v_i, v_ref)


@pytest.mark.parametrize("name", ["compact", "compact, 8-bit"])
def test_grouped_small_weights_train_as_the_ungrouped_ones_within_rounding(name, monkeypatch):
    runs = {}
    for grouping in ("no groups", "GPU-sized groups"):
        monkeypatch.setitem(compact_step.GROUP_ENTRIES, "cpu", GROUPINGS[grouping])
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, **EXACT_KWARGS, **VARIANTS[name])
        _train_steps(unet, opt, 6)
        runs[grouping] = _flat(unet)
    base = _flat(build_unet(SMALL_CONFIG, seed=0))
    diff = (runs["GPU-sized groups"] - runs["no groups"]).norm() / (runs["no groups"] - base).norm()
    # at most the stochastic rounding's random bits differ (drawn for a group, not per weight)
    assert diff <= TOLERANCE[VARIANTS[name].get("moments", "bf16")], float(diff)


@pytest.mark.parametrize("name", ["compact", "compact, 8-bit", "bitmask positions"])
def test_save_and_load_through_the_sparse_file(name, tmp_path):
    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=2e-3, fraction=0.1, progressive_iter=2, **VARIANTS[name])
    selected = {n: opt.selection.indices[n].clone() for n in opt.selection.names}
    _train_steps(unet, opt, 3)
    assert opt.churn.iloc[-1].froze > 0
    entries = opt.trained_entries()  # every entry that ever trained, frozen ones included
    assert all(torch.equal(entries[n], selected[n]) for n in selected)
    path = save_sparse(opt, tmp_path / "style.safetensors")
    fresh = build_unet(SMALL_CONFIG, seed=0)
    load_sparse(fresh, path)
    assert torch.equal(_flat(fresh), _flat(unet))


@pytest.mark.parametrize("grouping", ["default groups", "GPU-sized groups"])
@pytest.mark.parametrize("name", ["no value copy", "compact", "compact, 8-bit", "bitmask positions"])
def test_resume_through_state_dict_is_exact(name, grouping, tmp_path, monkeypatch):
    if GROUPINGS[grouping] is not None:
        monkeypatch.setitem(compact_step.GROUP_ENTRIES, "cpu", GROUPINGS[grouping])
    kwargs = dict(lr=3e-3, threshold=3e-3, rank_lambda=1e-2, progressive_iter=3, seed=4, **VARIANTS[name])
    a = build_unet(SMALL_CONFIG, seed=0)
    opt_a = SaRAAdamW(a, **kwargs)
    _train_steps(a, opt_a, 2)
    save_state({"weights": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.safetensors")
    _train_steps(a, opt_a, 3, seed=2)

    ckpt = load_state(tmp_path / "ckpt.safetensors")
    b = build_unet(SMALL_CONFIG, seed=0)
    b.load_state_dict(ckpt["weights"])
    opt_b = SaRAAdamW(b, **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    kinds = {moment_kind(opt_b.state[s.values]) for s in opt_b.slots if s.count}
    assert kinds == {opt_b.moments}  # restored in their format, not cast to fp32
    _train_steps(b, opt_b, 3, seed=2)
    assert opt_b.churn is not None
    assert torch.equal(_flat(a), _flat(b))


RESUME_ORDERS = ["weights, new optimizer, its state", "optimizer on the base, weights, its state",
                 "optimizer on the base, its state, weights"]


@pytest.mark.parametrize("order", RESUME_ORDERS)
@pytest.mark.parametrize("name", ["exact", "compact", "compact, 8-bit"])
def test_plain_pytorch_resume_with_a_fraction_in_any_order_equals_the_uninterrupted_run(name, order, tmp_path):
    """θ of a fraction is the trained weights' quantile on a new optimizer: the checkpoint's θ must win (it
    decides what freezes at progressive_iter, after the checkpoint); weights loaded after the optimizer's
    state must not be overwritten by the values the optimizer gathered before."""
    kwargs = dict(lr=3e-3, fraction=0.1, rank_lambda=1e-2, progressive_iter=4, seed=4, **VARIANTS.get(name, {}))
    a = build_unet(SMALL_CONFIG, seed=0)
    opt_a = SaRAAdamW(a, **kwargs)
    _train_steps(a, opt_a, 2)
    save_state({"weights": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.safetensors")
    _train_steps(a, opt_a, 4, seed=2)

    ckpt = load_state(tmp_path / "ckpt.safetensors")
    b = build_unet(SMALL_CONFIG, seed=0)
    if order == "weights, new optimizer, its state":
        b.load_state_dict(ckpt["weights"])
        opt_b = SaRAAdamW(b, **kwargs)
        assert opt_b.selection.extra["global_threshold"] != opt_a.selection.extra["global_threshold"]
        opt_b.load_state_dict(ckpt["opt"])
    elif order == "optimizer on the base, weights, its state":
        opt_b = SaRAAdamW(b, **kwargs)
        b.load_state_dict(ckpt["weights"])
        opt_b.load_state_dict(ckpt["opt"])
    else:
        opt_b = SaRAAdamW(b, **kwargs)
        opt_b.load_state_dict(ckpt["opt"])
        b.load_state_dict(ckpt["weights"])
    assert opt_b.report().equals(opt_a.report().assign(trainable=opt_b.report().trainable))
    _train_steps(b, opt_b, 4, seed=2)
    assert opt_b.churn.equals(opt_a.churn)
    assert torch.equal(_flat(a), _flat(b))
    assert opt_b.report().equals(opt_a.report())


@pytest.mark.parametrize("how", ["in place", "new .data"])
def test_weights_written_after_attaching_are_trained_from_not_overwritten(how):
    """A write into a trained weight between steps is what the next step starts from."""
    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
    _train_steps(unet, opt, 1)
    slot = max(opt.slots, key=lambda s: s.count)
    if how == "in place":
        with torch.no_grad():
            slot.param.zero_()
    else:
        slot.param.data = torch.zeros_like(slot.param)
    _train_steps(unet, opt, 1, seed=1)
    moved = slot.param.detach().reshape(-1)[slot.idx.long()]
    assert moved.abs().max() <= 1.01e-3  # one AdamW step of lr from zero, not the old values plus a step
    rest = torch.ones(slot.param.numel(), dtype=torch.bool)
    rest[slot.idx.long()] = False
    assert not slot.param.detach().reshape(-1)[rest].any()


def test_resume_across_formats_converts_the_moments():
    kwargs = dict(lr=3e-3, fraction=0.1, rank_lambda=0)
    a = build_unet(SMALL_CONFIG, seed=0)
    opt_a = SaRAAdamW(a, moments="8bit", **kwargs)
    _train_steps(a, opt_a, 2)
    b = build_unet(SMALL_CONFIG, seed=0)
    b.load_state_dict(a.state_dict())
    opt_b = SaRAAdamW(b, **kwargs)  # exact: fp32 moments
    opt_b.load_state_dict(opt_a.state_dict())
    slot_a, slot_b = next((sa, sb) for sa, sb in zip(opt_a.slots, opt_b.slots) if sa.count)
    state_b = opt_b.state[slot_b.values]
    assert moment_kind(state_b) == "fp32"
    torch.testing.assert_close(state_b["exp_avg"], load_moments(opt_a.state[slot_a.values])[0])
    _train_steps(b, opt_b, 1)  # and it trains on


def test_state_bytes_are_counted_from_the_tensors():
    exact_unet, compact_unet = build_unet(SMALL_CONFIG, seed=0), build_unet(SMALL_CONFIG, seed=0)
    exact = SaRAAdamW(exact_unet, fraction=0.1, rank_lambda=0)
    compact = SaRAAdamW(compact_unet, fraction=0.1, rank_lambda=0, compact=True, moments="8bit")
    for unet, opt in ((exact_unet, exact), (compact_unet, compact)):
        _train_steps(unet, opt, 1)
    b = state_bytes(exact)
    n = exact.num_trainable
    assert b["trained entries"] == n
    assert b["values"] == sum(s.values.numel() * 4 for s in exact.slots)
    assert b["moments"] == sum(sum(t.numel() * t.element_size() for t in moment_tensors(exact.state[s.values]))
                               + 4 for s in exact.slots if s.count)
    assert 16 <= b["bytes per entry"] < 16.1  # 4 value + 8 moments + 4 position (+ a step counter per weight)
    c = state_bytes(compact)
    assert c["values"] == 4 * len(compact.slots)  # one shared number per placeholder
    assert c["bytes per entry"] <= 8 and c["bytes per entry"] < b["bytes per entry"] / 4
    # initial values of 2-D weights count while the nuclear-norm term is on
    with_nuclear = SaRAAdamW(build_unet(SMALL_CONFIG, seed=1), fraction=0.1, rank_lambda=1e-3)
    two_d = sum(s.count for s in with_nuclear.slots if s.param.ndim == 2)
    assert state_bytes(with_nuclear)["initial"] == 4 * two_d > 0


def test_state_bytes_per_entry_after_progressive_adjustment_counts_only_the_entries_still_training():
    """Frozen entries keep only their positions: counted apart, not against the entries that still train."""
    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=3e-3, threshold=3e-3, rank_lambda=0, weight_decay=0.0, progressive_iter=3)
    _train_steps(unet, opt, 3)  # lr ~ θ: many entries cross θ and freeze, others train on
    b = state_bytes(opt)
    frozen = int(opt.churn.iloc[-1].froze)
    assert frozen > 0 and b["frozen entries"] == frozen
    assert b["trained entries"] == opt.num_trainable == opt.selection.total_selected - frozen
    assert b["frozen positions"] == 4 * frozen  # int32 positions, nothing else
    per_entry = sum(b[part] for part in ("values", "positions", "moments", "initial"))
    assert b["total"] == per_entry + b["frozen positions"]
    assert b["bytes per entry"] == per_entry / b["trained entries"]
    # as before adjustment: 4 value + 8 moments + 4 position, plus a 4-byte step counter per weight
    assert 16 <= b["bytes per entry"] <= 16 + 4 * len(opt.slots) / b["trained entries"]


def test_state_bytes_of_something_else_than_the_optimizer_is_a_clear_error():
    unet = build_unet(SMALL_CONFIG, seed=0)
    SaRAAdamW(unet, fraction=0.1)
    with pytest.raises(ConfigError, match="state_bytes needs the SaRAAdamW optimizer.*got a UNet2DConditionModel"):
        state_bytes(unet)


@pytest.mark.parametrize("kwargs, msg", [
    ({"positions": "csr"}, "positions must be one of"), ({"moments": "fp8"}, "moments must be one of"),
    ({"value_copy": "no"}, "value_copy"), ({"compact": 1}, "compact"),
])
def test_bad_state_options(kwargs, msg):
    unet = build_unet(SMALL_CONFIG, seed=0)
    with pytest.raises(ConfigError, match=msg):
        SaRAAdamW(unet, **kwargs)
    assert not hasattr(unet.conv_in.weight, "_sara_edu_owner")


def test_compact_sara_in_the_training_loop(tiny_pipe):
    method = SaRA(fraction=0.2, compact=True, moments="8bit")
    ds = StyleDataset(None, digits=[0, 1], limit_per_digit=8)
    h = train(tiny_pipe, ds, method, steps=10, lr=1e-2, batch_size=4, progress=False, seed=0)
    assert h.loss.tail(4).mean() < 0.8 * h.loss.head(2).mean()
    opt = method.optimizer
    assert not opt.value_copy and opt.positions == "delta" and opt.moments == "8bit"
    assert method.churn is not None
    b = state_bytes(opt)  # after progressive adjustment: positions of every entry that trained, moments of the rest
    assert b["positions"] <= 1.02 * opt.selection.total_selected
    assert b["moments"] <= 2.1 * opt.num_trainable + 12 * len(opt.slots)


@pytest.mark.parametrize("options", [{"value_copy": False, "positions": "delta"}, {"positions": "bitmask"}])
def test_compact_gradients_accumulate_clip_through_the_model_and_match_the_exact_path(options):
    """Two backward passes, clip_grad_norm_(model.parameters()), model.zero_grad(): as the exact optimizer."""
    runs = []
    for opts in ({}, options):
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0, fused=False, **opts)
        for seed in (0, 1):  # gradient accumulation: autograd adds into SaRA's SelectedGrad
            x, t, c = _batch(seed)
            unet(x, t, c).sample.pow(2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1e-3)
        opt.step()
        unet.zero_grad()
        before = _flat(unet)
        opt.step()  # cleared through the model: no update
        assert torch.equal(_flat(unet), before)
        runs.append((float(norm), before))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    assert torch.equal(runs[1][1], runs[0][1])


def test_compact_sara_resumes_from_a_training_checkpoint(tmp_path):
    """train(..., checkpoint_every) then train(..., resume=True) equals the uninterrupted compact run."""
    from sara_edu.world.model import TinyDiffusion
    from sara_edu.world.text import TinyTextEncoder

    data = StyleDataset("cyberpunk", digits=[0, 1], limit_per_digit=4)

    def run(**kwargs):
        pipe = TinyDiffusion(build_unet(SMALL_CONFIG, seed=0), TinyTextEncoder(seed=0))
        method = SaRA(fraction=0.1, compact=True, moments="8bit")  # progressive adjustment at step 3
        train(pipe, data, method, steps=6, lr=1e-3, batch_size=4, seed=3, progress=False, **kwargs)
        return _flat(pipe.unet)

    straight = run()
    run(stop_after=4, checkpoint_dir=tmp_path, checkpoint_every=4)
    steps_run = []
    resumed = run(checkpoint_dir=tmp_path, resume=True, callback=lambda step, pipe, opt: steps_run.append(step))
    assert steps_run == [5, 6]  # it did resume from the checkpoint of step 4
    assert torch.equal(resumed, straight)
