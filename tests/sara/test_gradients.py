"""SaRA's gradients as an ordinary training loop sees them: clipping, zeroing, frozen parts, bad input."""
import copy
import sys
import types

import pytest
import torch
from torch import nn

from sara_edu.errors import ConfigError
from sara_edu.sara import SaRAAdamW
from sara_edu.sara.grad import SelectedGrad
from sara_edu.sara.nuclear import nuclear_norm_grad
from sara_edu.sara.selection import select_parameters
from sara_edu.training.selective import MaskedAdamW, SelectiveFineTuning
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 16, 16, generator=g).to(dtype), torch.tensor([10, 700]),
            torch.randn(2, 4, 32, generator=g).to(dtype))


def _loss(unet, batch):
    x, t, c = batch
    return unet(x, t, c).sample.pow(2).mean()


def _masked_dense_grads(ref, opt):
    """The reference: dense autograd gradients of a copy, zero off SaRA's selection."""
    own = dict(ref.named_parameters())
    return {s.name: own[s.name].grad * opt.selection.mask(s.name) for s in opt.slots if s.idx.numel()}


@pytest.fixture
def pair():
    unet = build_unet(SMALL_CONFIG, seed=0).double()
    ref = copy.deepcopy(unet)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
    return unet, ref, opt


# ----------------------------------------------------------------- clipping through model.parameters()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_norm_over_the_model_returns_the_true_norm_and_clips(pair, foreach):
    unet, ref, opt = pair
    batch = _batch(torch.float64)
    _loss(unet, batch).backward()
    _loss(ref, batch).backward()
    dense = _masked_dense_grads(ref, opt)
    true_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in dense.values()]))
    norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1e-3, foreach=foreach)
    assert float(norm) == pytest.approx(float(true_norm), rel=1e-12) and float(norm) > 1e-2
    coef = 1e-3 / (float(true_norm) + 1e-6)
    for slot in opt.slots:  # the optimizer's gradient is the clipped one, and p.grad shows it
        if slot.idx.numel():
            expected = dense[slot.name].reshape(-1)[slot.idx.long()] * coef
            torch.testing.assert_close(slot.values.grad, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(slot.param.grad.to_dense(), dense[slot.name] * coef, rtol=1e-12, atol=0)


def test_tiny_max_norm_changes_the_weights_and_clip_value_works():
    def run(max_norm):
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
        norms = []
        for step in range(2):
            _loss(unet, _batch(seed=step)).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(unet.parameters(), max_norm)))
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in unet.parameters()]), norms

    loose, loose_norms = run(1e3)
    tight, tight_norms = run(1e-9)
    assert loose_norms[0] == tight_norms[0] > 0  # the same first gradient, now really clipped
    assert (loose - tight).abs().max() > 1e-5

    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=0)
    _loss(unet, _batch()).backward()
    torch.nn.utils.clip_grad_value_(unet.parameters(), 1e-6)
    assert max(float(s.values.grad.abs().max()) for s in opt.slots if s.idx.numel()) <= 1e-6


def test_the_nuclear_norm_gradient_is_added_after_clipping_and_not_clipped():
    """As documented: clip_grad_norm_ bounds the loss gradient; step() then adds λ·U·Vᵀ at the mask, unclipped."""
    unet = build_unet(SMALL_CONFIG, seed=0).double()
    opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=1e-3)
    for step in range(2):  # ΔW ≠ 0, so the nuclear-norm gradient is not zero
        _loss(unet, _batch(torch.float64, seed=step)).backward()
        opt.step()
        opt.zero_grad()
    _loss(unet, _batch(torch.float64, seed=2)).backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1e-9)
    clipped = {s.name: s.values.grad.clone() for s in opt.slots if s.count}
    nuclear = {s.name: nuclear_norm_grad(opt._delta(s))[0].reshape(-1)[s.idx.long()]
               for s in opt.eligible_for_nuclear()}
    opt.step()
    name = opt.last_nuclear["name"]
    slot = next(s for s in opt.slots if s.name == name)
    added = slot.values.grad - clipped[name]  # step() adds into the gradient the loop sees
    torch.testing.assert_close(added, 1e-3 * nuclear[name], rtol=1e-12, atol=1e-18)
    assert float(torch.linalg.vector_norm(slot.values.grad)) > 1e3 * 1e-9  # far beyond the clipped norm
    assert all(torch.equal(s.values.grad, clipped[s.name]) for s in opt.slots if s.count and s.name != name)


@pytest.mark.parametrize("unscale", [False, True])
@pytest.mark.parametrize("options", [{}, {"compact": True}])
def test_grad_scaler_with_or_without_unscale_and_with_a_skipped_step_equals_the_unscaled_run(options, unscale):
    """The nuclear-norm gradient (λ = 1 here) is added to unscaled gradients; a step with inf is skipped whole."""
    def run(scaled):
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=1.0, progressive_iter=4, **options)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
        taken = 0
        for i in range(6):
            loss = _loss(unet, _batch(seed=i))
            if not scaled:
                if i != 2:  # the step the scaled run skips
                    loss.backward()
                    opt.step()
                    taken += 1
            else:
                if i == 2:
                    loss = loss * float("inf")  # an overflow: GradScaler must skip this step
                scaler.scale(loss).backward()
                if unscale:
                    scaler.unscale_(opt)
                before = opt.steps_done
                scaler.step(opt)
                scaler.update()
                taken += opt.steps_done - before
            opt.zero_grad()
        assert taken == opt.steps_done == 5 and opt.churn is not None
        return torch.cat([p.detach().reshape(-1) for p in unet.parameters()])

    assert torch.equal(run(scaled=True), run(scaled=False))


def test_selected_grad_is_clear_about_what_it_is_and_refuses_other_ops(pair):
    unet, _, opt = pair
    _loss(unet, _batch(torch.float64)).backward()
    slot = next(s for s in opt.slots if s.idx.numel() > 10)
    g = slot.param.grad
    assert isinstance(g, SelectedGrad) and g.values is slot.values.grad and g.shape == slot.param.shape
    assert slot.name in repr(g)
    with pytest.raises(ConfigError, match=f"{slot.name}.*to_dense"):
        g.exp()
    with pytest.raises(ConfigError, match="untrained zeros"):
        g.clamp_(min=1.0)
    with pytest.raises(ConfigError, match="not saved"):
        torch.save(g, "/dev/null")


# ----------------------------------------------------------------- zeroing through the model


@pytest.mark.parametrize("how", ["model.zero_grad()", "model.zero_grad(set_to_none=False)", "optimizer.zero_grad()"])
def test_zero_grad_through_the_model_or_the_optimizer_clears_sara_gradients(how):
    def trained(clear_between):
        unet = build_unet(SMALL_CONFIG, seed=0).double()
        opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1, rank_lambda=0)
        if clear_between:
            _loss(unet, _batch(torch.float64, seed=1)).backward()  # must be forgotten
            eval(how, {"model": unet, "optimizer": opt})
        _loss(unet, _batch(torch.float64, seed=2)).backward()
        opt.step()
        return torch.cat([p.detach().reshape(-1) for p in unet.parameters()])

    torch.testing.assert_close(trained(True), trained(False), rtol=0, atol=0)


def test_model_zero_grad_after_backward_means_no_update():
    unet = build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1, rank_lambda=0, weight_decay=0.5)
    before = [p.detach().clone() for p in unet.parameters()]
    _loss(unet, _batch()).backward()
    unet.zero_grad()
    assert all(p.grad is None for p in unet.parameters())
    opt.step()  # like AdamW, parameters without a gradient are not touched (not even decayed)
    assert all(torch.equal(a, p) for a, p in zip(before, unet.parameters()))


# ----------------------------------------------------------------- frozen parts stay frozen


def test_a_part_frozen_before_attaching_is_not_selected_and_stays_bitwise():
    unet = build_unet(SMALL_CONFIG, seed=0)
    unet.down_blocks[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if n.startswith("down_blocks.0.")}
    opt = SaRAAdamW(unet, lr=1e-2, fraction=0.1)
    assert frozen and not any(n in opt.selection.names for n in frozen)
    for step in range(2):
        _loss(unet, _batch(seed=step)).backward()
        opt.step()
        opt.zero_grad()
    own = dict(unet.named_parameters())
    assert all(torch.equal(own[n], w) for n, w in frozen.items())
    assert all(not own[n].requires_grad for n in frozen)
    opt.detach()
    assert all(not own[n].requires_grad for n in frozen) and own["conv_in.weight"].requires_grad

    included = SaRAAdamW(unet, lr=1e-2, fraction=0.1, include_frozen=True)
    assert set(frozen) <= set(included.selection.names)
    included.detach()


def test_the_selective_baseline_follows_the_same_rule():
    unet = build_unet(SMALL_CONFIG, seed=0)
    unet.mid_block.requires_grad_(False)
    selection = select_parameters(unet, fraction=0.1)
    assert not any(n.startswith("mid_block.") for n in selection.names)
    method = SelectiveFineTuning(fraction=0.1)
    opt = method.build_optimizer(unet, lr=1e-3, weight_decay=0.0, total_steps=2)
    assert not any(n.startswith("mid_block.") for n in opt.names)
    assert any(n.startswith("mid_block.") for n in select_parameters(unet, fraction=0.1, include_frozen=True).names)


def test_a_fully_frozen_model_is_a_clear_error():
    unet = build_unet(SMALL_CONFIG, seed=0).requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad=False.*include_frozen=True"):
        SaRAAdamW(unet, lr=1e-3)


# ----------------------------------------------------------------- what SaRAAdamW takes


def test_attaching_to_a_pipeline_or_to_parameters_is_a_clear_error(tiny_pipe):
    unet = tiny_pipe.unet
    with pytest.raises(ConfigError, match=r"pipe\.unet"):
        SaRAAdamW(tiny_pipe, lr=1e-3)
    with pytest.raises(ConfigError, match=r"not its parameters.*SaRAAdamW\(unet"):
        SaRAAdamW(unet.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="not its parameters"):
        SaRAAdamW(list(unet.parameters()), lr=1e-3)
    with pytest.raises(ConfigError, match="pipe.unet"):
        MaskedAdamW(tiny_pipe, select_parameters(unet, fraction=0.1))
    assert not any(getattr(p, "_sara_edu_owner", None) for p in unet.parameters())


# ----------------------------------------------------------------- setups that cannot be right


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_attaching_to_a_ddp_wrapped_model_is_refused(one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match="bare model first"):
        SaRAAdamW(DistributedDataParallel(model), lr=1e-3, fraction=0.5)


def test_fsdp_is_refused_before_and_after_attaching(one_process_group):
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    with pytest.raises(ConfigError, match="FSDP"):
        SaRAAdamW(sharded, lr=1e-3, fraction=0.5)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    fully_shard(model)  # replaces the weights by sharded DTensors: SaRA would train orphans
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(ConfigError, match="no longer the tensor SaRA attached to"):
        opt.step()


def test_accelerate_sharding_is_refused_at_attach_and_at_step(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    state = types.SimpleNamespace(AcceleratorState=types.SimpleNamespace(_shared_state={"distributed_type": "FSDP"}))
    monkeypatch.setitem(sys.modules, "accelerate.state", state)
    with pytest.raises(ConfigError, match="FSDP"):
        SaRAAdamW(nn.Linear(3, 3), lr=1e-3, fraction=0.5)
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(ConfigError, match="FSDP"):
        opt.step()
    state.AcceleratorState._shared_state["distributed_type"] = "DEEPSPEED"
    with pytest.raises(ConfigError, match="DEEPSPEED"):
        opt.step()


def test_replaced_weights_and_sharded_parameters_are_refused():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # new Parameter objects
    with pytest.raises(ConfigError, match="no longer the tensor SaRA attached to"):
        opt.step()
    zero3 = nn.Linear(4, 4)
    zero3.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO"):
        SaRAAdamW(zero3, lr=1e-3, fraction=0.5)


def test_on_several_processes_ddp_is_kept_away_and_detach_cleans_up(launched_rank):
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.3)
    trained = [s.name for s in opt.slots if s.idx.numel()]
    assert model._ddp_params_and_buffers_to_ignore == trained
    # one parameter SaRA does not train (the smallest) requires grad until the first forward: DDP can be built
    spare = [p for n, p in model.named_parameters() if n not in trained]
    anchors = [p for p in spare if p.requires_grad]
    assert len(anchors) == 1 and anchors[0].numel() == min(p.numel() for p in spare)
    anchor = anchors[0]
    with torch.no_grad():
        model(torch.randn(2, 6))
    assert anchor.requires_grad  # a forward without grad (validation) changes nothing
    model(torch.randn(2, 6)).sum().backward()
    assert not anchor.requires_grad and anchor.grad is None
    opt.detach()
    assert "_ddp_params_and_buffers_to_ignore" not in model.__dict__
    assert all(p.requires_grad for p in model.parameters())


def test_a_deleted_optimizer_is_freed_although_its_gradients_were_used():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    model(torch.randn(2, 6)).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None  # the hooks on the weights hold no reference to it


def test_a_lone_process_of_a_multi_process_launch_refuses_to_train(monkeypatch, request):
    model = nn.Linear(6, 2)
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.5)
    request.getfixturevalue("launched_rank")  # the launch's WORLD_SIZE appears only after attaching
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(ConfigError, match="WORLD_SIZE=2.*init_process_group"):
        opt.step()
