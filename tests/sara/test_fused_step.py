"""The compiled step (``compiled=True``) and the per-layer mode (``step_in_backward=True``) against the stock step.

Compilation is slow (seconds per kernel), so every test here shares the two kernels of one process
(``dynamic=True``: one kernel serves every size), and the models are small.
"""
import pytest
import torch
from torch import nn

from sara_edu.errors import ConfigError
from sara_edu.sara import compact_step, fused_step
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
# lr large enough that six steps move the weights far, λ large enough that the nuclear term matters,
# progressive adjustment in the middle: every part of the step runs
SETTINGS = dict(lr=3e-3, fraction=0.2, rank_lambda=5e-2, progressive_iter=3, nuclear_targets="conv")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 4, 32, generator=g)


def _run(steps=6, unet=None, **options):
    unet = unet or build_unet(SMALL_CONFIG, seed=0)
    opt = SaRAAdamW(unet, **{**SETTINGS, **options})
    for i in range(steps):
        x, t, c = _batch(i)
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return unet, opt


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _checkpointed_unet():
    unet = build_unet(SMALL_CONFIG, seed=0)
    unet.enable_gradient_checkpointing()  # diffusers' own switch: each block's forward recomputed in backward
    return unet.train()


@pytest.fixture(autouse=True)
def _no_grouping(monkeypatch):
    # the stock compact step updates small weights in groups, which draws the stochastic rounding of bf16 moments
    # in another order; one weight at a time it is the compiled step's order (fp32 moments do not care)
    monkeypatch.setitem(compact_step.GROUP_ENTRIES, "cpu", 0)


@pytest.mark.parametrize("options", [dict(), dict(value_copy=False), dict(nuclear_via="direct"),
                                     dict(compact=True)], ids=["exact", "no copy", "direct nuclear", "compact"])
def test_compiled_step_is_the_stock_step_bit_for_bit(options):
    stock, _ = _run(**options)
    compiled, opt = _run(**options, compiled=True)
    assert opt.steps_done == 6 and opt.churn is not None  # progressive adjustment ran
    assert torch.equal(_flat(compiled), _flat(stock))
    assert not torch.equal(_flat(compiled), _flat(build_unet(SMALL_CONFIG, seed=0)))  # it trained


@pytest.mark.parametrize("options", [dict(), dict(nuclear_via="direct"), dict(compiled=True),
                                     dict(value_copy=False, compiled=True)],
                         ids=["exact", "direct nuclear", "compiled", "compiled, no copy"])
def test_step_in_backward_is_the_default_step_bit_for_bit(options):
    stock, _ = _run(**{k: v for k, v in options.items() if k != "compiled"})
    per_layer, opt = _run(**options, step_in_backward=True)
    assert torch.equal(_flat(per_layer), _flat(stock))
    # it keeps no selected gradient: every trained weight shows the marker, which holds nothing
    x, t, c = _batch(0)
    opt.model(x, t, c).sample.pow(2).mean().backward()
    assert all(s.values.grad is None or s.values.grad.values.numel() == 0 for s in opt.slots)


def test_the_stock_kernels_vector_width_is_found_and_used():
    width = fused_step.stock_vector_width()
    assert width in (1, 4, 8, 16, 32, 64)
    # sizes around the width: the scalar tail of the stock kernel rounds v otherwise, and the compiled step follows
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    for n in (1, 3, width, width + 3, 4 * width + 5):
        for step in (1.0, 2.0, 50.0):
            flat, grad = torch.randn(3 * n, generator=g) * 0.05, torch.randn(n, generator=g) * 1e-3
            m, v = torch.randn(n, generator=g) * 1e-4, torch.rand(n, generator=g) * 1e-7
            idx = torch.randperm(3 * n, generator=g)[:n].sort().values
            mine, m1, v1 = flat.clone(), m.clone(), v.clone()
            fused_step.fused_adamw_entries(mine, idx, grad, m1, v1, None, step, group)
            w, m2, v2 = flat[idx].clone(), m.clone(), v.clone()
            torch._fused_adamw_([w], [grad], [m2], [v2], [], [torch.tensor(step)], lr=1e-2, beta1=0.9, beta2=0.999,
                                weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)
            assert torch.equal(m1, m2) and torch.equal(v1, v2) and torch.equal(mine[idx], w), (n, step)


def test_compilations_are_bounded_and_counted():
    _run(steps=2, compiled=True)  # the kernels exist now
    before = dict(fused_step.COMPILE_STATS)
    # another model with other sizes, progressive adjustment shrinking every weight: no new compilation
    unet = build_unet(dict(SMALL_CONFIG, block_out_channels=[8, 16, 16], norm_num_groups=4), seed=1)
    _run(steps=4, unet=unet, compiled=True)
    assert fused_step.COMPILE_STATS["compilations"] == before["compilations"]
    assert before["compilations"] >= 1 and before["seconds"] > 0


def test_a_weight_the_nuclear_term_picks_without_a_loss_gradient_still_moves_as_in_the_default_step():
    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"used": nn.Linear(40, 30), "unused": nn.Linear(40, 30)})

    def run(**options):
        m = model()
        opt = SaRAAdamW(m, lr=1e-2, fraction=0.3, rank_lambda=0.1, **options)
        for i in range(4):
            m["used"](torch.randn(5, 40, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return m, opt

    stock, _ = run()
    per_layer, opt = run(step_in_backward=True)
    assert torch.equal(_flat(per_layer), _flat(stock))
    assert not torch.equal(per_layer["unused"].weight, model()["unused"].weight)  # the term alone moved it


def test_step_in_backward_refuses_what_needs_every_gradient_first():
    unet, opt = _run(steps=1, step_in_backward=True)
    x, t, c = _batch(1)
    unet(x, t, c).sample.pow(2).mean().backward()
    with pytest.raises(ConfigError, match="step_in_backward=True.*clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    with pytest.raises(ConfigError, match="step_in_backward=True"):
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
    # a second backward pass before step(): gradient accumulation
    with pytest.raises(ConfigError, match="second gradient.*accumulation"):
        unet(x, t, c).sample.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(unet(x, t, c).sample.pow(2).mean()).backward()
    with pytest.raises(ConfigError, match="GradScaler"):
        scaler.step(opt)
    opt.step()
    opt.zero_grad()
    unet(x, t, c).sample.pow(2).mean().backward()  # after zero_grad, without step(): updated twice in one step
    opt.zero_grad()
    with pytest.raises(ConfigError, match="once per step"):
        unet(x, t, c).sample.pow(2).mean().backward()


def test_options_are_checked():
    unet = build_unet(SMALL_CONFIG, seed=0)
    with pytest.raises(ConfigError, match="compiled must be True or False.*'yes'"):
        SaRAAdamW(unet, compiled="yes")
    with pytest.raises(ConfigError, match="step_in_backward must be True or False"):
        SaRAAdamW(unet, step_in_backward=1)


def test_train_refuses_clipping_with_step_in_backward(tiny_pipe):
    from sara_edu.training.loop import train
    from sara_edu.training.sara import SaRA
    from sara_edu.world.data import StyleDataset

    data = StyleDataset("cyberpunk", limit_per_digit=1)
    with pytest.raises(ConfigError, match="max_grad_norm=1.0.*max_grad_norm=None"):
        train(tiny_pipe, data, SaRA(step_in_backward=True), steps=2, batch_size=2, progress=False)
    history = train(tiny_pipe, data, SaRA(step_in_backward=True, compiled=True), steps=2, batch_size=2,
                    max_grad_norm=None, progress=False)
    assert len(history) == 2


def test_resuming_moves_between_the_modes_exactly():
    # a checkpoint of the default step resumes under the compiled per-layer mode (the state has the same format)
    straight, _ = _run(steps=5)
    unet, opt = _run(steps=3)
    state, weights = opt.state_dict(), {k: v.clone() for k, v in unet.state_dict().items()}
    resumed = build_unet(SMALL_CONFIG, seed=0)
    resumed.load_state_dict(weights)
    opt2 = SaRAAdamW(resumed, **SETTINGS, compiled=True, step_in_backward=True)
    opt2.load_state_dict(state)
    for i in range(3, 5):
        x, t, c = _batch(i)
        resumed(x, t, c).sample.pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    assert torch.equal(_flat(resumed), _flat(straight))


def test_step_in_backward_with_gradient_checkpointing_is_the_default_step():
    # diffusers' gradient checkpointing recomputes each block's forward inside backward: every weight is still
    # updated after the last use of its old value (what the per-layer mode relies on)
    stock, _ = _run(steps=3, unet=_checkpointed_unet())
    per_layer, _ = _run(steps=3, unet=_checkpointed_unet(), step_in_backward=True)
    assert torch.equal(_flat(per_layer), _flat(stock))
    assert not torch.equal(_flat(stock), _flat(_checkpointed_unet()))


def test_step_in_backward_refuses_several_processes(launched_rank):
    with pytest.raises(ConfigError, match="step_in_backward=True.*one process"):
        SaRAAdamW(build_unet(SMALL_CONFIG, seed=0), step_in_backward=True)


@pytest.fixture
def _small_blocks(monkeypatch):
    # every Linear/Conv2d of the small model has its gradient made in several blocks of rows, and the selected
    # gradient reaches AdamW in several pieces, some joined across blocks (a multiple of the kernel's vector width)
    from sara_edu.sara import row_grad

    monkeypatch.setattr(row_grad, "ROW_BLOCK_BYTES", 512)
    monkeypatch.setattr(compact_step, "PIECE_ENTRIES", 64)


def _distance(model, reference):
    """How far ``model`` is from ``reference``, relative to how far training moved ``reference``."""
    moved = (_flat(reference) - _flat(build_unet(SMALL_CONFIG, seed=0))).norm()
    return float((_flat(model) - _flat(reference)).norm() / moved)


@pytest.mark.parametrize("options", [dict(), dict(nuclear_via="direct"), dict(compiled=True),
                                     dict(value_copy=False, compiled=True), dict(positions="delta"),
                                     dict(rank_lambda=0.0)],
                         ids=["exact", "direct nuclear", "compiled", "compiled, no copy", "delta positions",
                              "no nuclear term"])
def test_weights_updated_from_blocks_of_rows_are_the_default_step(_small_blocks, options):
    from sara_edu.sara.row_grad import RowBlockConv2d, RowBlockLinear

    stock, _ = _run(**{k: v for k, v in options.items() if k != "compiled"})
    per_layer, opt = _run(**options, step_in_backward=True)
    routed = [m for m in per_layer.modules() if isinstance(m, (RowBlockLinear, RowBlockConv2d))]
    assert len(routed) > 10 and any(isinstance(m, RowBlockConv2d) for m in routed)
    # a block of rows of a weight's gradient is the same sums as autograd's, from a matmul/convolution of another
    # shape, which can round otherwise in the last bits: 1.7e-6 of the training's movement after six steps here
    assert _distance(per_layer, stock) < 1e-4
    # detaching gives back ordinary layers
    opt.detach()
    assert {type(m) for m in per_layer.modules()} == {type(m) for m in stock.modules()}


def test_a_gradient_in_blocks_of_rows_is_autograds(_small_blocks):
    from sara_edu.sara.row_grad import _RowBlockGrad, _row_blocks

    for layer, x in ((nn.Linear(24, 40), torch.randn(3, 7, 24)), (nn.Conv2d(6, 20, 3, padding=1), torch.randn(2, 6, 9, 9))):
        x.requires_grad_(True)
        out = layer(x)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], gout)
        taken = []

        def update(blocks):  # None: "can you take a gradient?"
            taken.extend(block() for _, _, block in blocks or ())
            return True

        mine = _RowBlockGrad.apply(x, layer.weight, layer.bias, layer, update)
        assert torch.equal(mine, out)  # the same forward call
        gx, gb = torch.autograd.grad(mine, [x, layer.bias], gout)
        assert torch.equal(gx, grads[0])  # the same kernel call
        torch.testing.assert_close(gb, grads[2], rtol=1e-5, atol=1e-7)  # a plain sum (the kernel's is fused)
        assert len(taken) > 2
        torch.testing.assert_close(torch.cat(taken).view(layer.weight.shape), grads[1], rtol=1e-5, atol=1e-7)


def test_blocks_of_rows_with_gradient_checkpointing_and_refusals(_small_blocks):
    stock, _ = _run(steps=3, unet=_checkpointed_unet())
    per_layer, opt = _run(steps=3, unet=_checkpointed_unet(), step_in_backward=True)
    assert _distance(per_layer, stock) < 1e-4
    x, t, c = _batch(1)
    per_layer(x, t, c).sample.pow(2).mean().backward()
    with pytest.raises(ConfigError, match="step_in_backward=True.*clip_grad_norm_"):  # a routed weight too
        torch.nn.utils.clip_grad_norm_(per_layer.conv_in.parameters(), 1.0)
    with pytest.raises(ConfigError, match="second gradient.*accumulation|once per step"):
        per_layer(x, t, c).sample.pow(2).mean().backward()


def test_a_routed_layer_whose_optimizer_is_gone_gets_its_whole_gradient(_small_blocks):
    import copy
    import gc

    layer = nn.Sequential(nn.Linear(40, 64))
    opt = SaRAAdamW(layer, lr=1e-2, fraction=0.3, step_in_backward=True)
    assert type(layer[0]).__name__ == "RowBlockLinear"
    twin = copy.deepcopy(layer)  # a copy is an ordinary layer again: its forward is its parent's
    x = torch.randn(5, 40)
    twin[0].weight.requires_grad_(True)
    twin(x).pow(2).sum().backward()
    del opt
    gc.collect()
    layer(x).pow(2).sum().backward()
    assert type(layer[0].weight.grad) is torch.Tensor
    torch.testing.assert_close(layer[0].weight.grad, twin[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_a_large_layer_called_twice_in_one_forward_is_refused_with_the_way_out(_small_blocks, monkeypatch):
    from sara_edu.sara import row_grad

    def twice(bytes_):
        monkeypatch.setattr(row_grad, "ROW_BLOCK_BYTES", bytes_)
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(40, 40))
        opt = SaRAAdamW(layer, lr=1e-2, fraction=0.3, step_in_backward=True)
        layer(layer(torch.randn(5, 40))).pow(2).sum().backward()
        opt.step()
        return layer

    with pytest.raises(ConfigError, match=r"called twice in one forward.*ROW_BLOCK_BYTES = float\('inf'\)"):
        twice(512)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(40, 40))
    opt = SaRAAdamW(reference, lr=1e-2, fraction=0.3)
    reference(reference(torch.randn(5, 40))).pow(2).sum().backward()
    opt.step()
    assert torch.equal(twice(float("inf"))[0].weight, reference[0].weight)  # whole: both calls' gradient, summed


def test_blocks_of_rows_under_bf16_autocast_and_grouped_convolutions(_small_blocks):
    # under autocast a routed layer runs as its parent (autograd undoes the weight's cast itself); a grouped
    # convolution is never routed (a block of output channels would not see every input)
    from sara_edu.sara.row_grad import routable

    assert not routable(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=2).weight)

    def run(**options):
        unet = build_unet(SMALL_CONFIG, seed=0)
        opt = SaRAAdamW(unet, **SETTINGS, **options)
        for i in range(2):
            x, t, c = _batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = unet(x, t, c).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return unet

    assert torch.equal(_flat(run(step_in_backward=True)), _flat(run()))
