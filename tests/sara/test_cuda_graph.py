"""``cuda_graphs=True`` on the CPU: the graph's bookkeeping against the eager exact step.

CI has no GPU, so a recording stand-in takes the CUDA graph's place: capturing
records the aten calls *without running them*, keeping tensors by identity and
every other argument by value (as a CUDA graph keeps addresses and bakes
scalars), and ``replay()`` runs the record again. What the graph path decides
itself is then tested here: which tensors are captured, the gradient buffers
the hooks fill, the lr read from a tensor, when a step captures again and when
it runs eagerly. ``tests/cuda`` runs the same comparisons with real graphs.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sara_edu.errors import ConfigError
from sara_edu.sara import cuda_graph, state_bytes
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.training import SaRA
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

SMALL_CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
# lr a float32 number (the graph reads it from a float32 tensor): the runs are then equal bit for bit
SETTINGS = dict(lr=2.0**-9, fraction=0.2, rank_lambda=5e-2, progressive_iter=3, nuclear_targets="conv")


class _Recorder(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        returns = schema.returns
        if not schema.is_mutable or (returns and (len(returns) > 1 or returns[0].alias_info is None)):
            raise AssertionError(f"{func} in a captured step: a graph may only write into tensors that exist")
        self.calls.append((func, args, kwargs or {}))
        return args[0] if returns else None


class RecordedGraph:
    """A CUDA graph's stand-in: ``capture()`` records without running, ``replay()`` runs the record."""

    def __init__(self):
        self.calls = []

    def capture(self):
        return _Recorder(self.calls)

    def replay(self):
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_graph, "new_graph", lambda device: RecordedGraph())


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 4, 32, generator=g)


def _run(steps=6, unet=None, opt=None, first=0, scheduler=None, clip=None, **options):
    unet = unet or build_unet(SMALL_CONFIG, seed=0)
    opt = opt or SaRAAdamW(unet, **{**SETTINGS, **options})
    sched = scheduler(opt) if scheduler else None
    for i in range(first, first + steps):
        x, t, c = _batch(i)
        unet(x, t, c).sample.pow(2).mean().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    return unet, opt


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("options", [dict(), dict(nuclear_via="direct"), dict(rank_lambda=0.0)],
                         ids=["exact", "direct nuclear", "no nuclear term"])
def test_graphed_step_is_the_eager_step_bit_for_bit(graphs_on_cpu, options):
    eager, _ = _run(**options)
    graphed, opt = _run(**options, cuda_graphs=True)
    assert opt.churn is not None  # progressive adjustment ran at step 3
    assert torch.equal(_flat(graphed), _flat(eager))
    # step 1 eager (no AdamW state yet), a graph for steps 2-3, another after progressive adjustment moved
    # every tensor (steps 4-6)
    assert opt.graph_stats == {"captures": 2, "replays": 5, "eager": 1}


def test_the_learning_rate_is_read_at_each_replay(graphs_on_cpu):
    # a float baked into the graph would keep training at the first lr; the schedule's lrs are float32 numbers
    def halve(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.25)

    eager, _ = _run(scheduler=halve)
    graphed, opt = _run(scheduler=halve, cuda_graphs=True)
    assert opt.param_groups[0]["lr"] == 2.0**-11
    assert torch.equal(_flat(graphed), _flat(eager))


def test_an_lr_that_is_no_float32_number_rounds_as_torch_capturable_adamw(graphs_on_cpu):
    base = _flat(build_unet(SMALL_CONFIG, seed=0))
    eager, _ = _run(lr=1e-3, progressive_iter=None)
    graphed, _ = _run(lr=1e-3, progressive_iter=None, cuda_graphs=True)
    moved = (_flat(eager) - base).abs().max()
    assert moved > 1e-3
    assert (_flat(graphed) - _flat(eager)).abs().max() <= 1e-5 * moved


def test_the_hooks_gather_into_the_graphs_buffers(graphs_on_cpu):
    unet, opt = _run(steps=2, cuda_graphs=True)
    buffers = {s.name: s.grad_buffer for s in opt.slots if s.count}
    assert all(b is not None for b in buffers.values())
    x, t, c = _batch(9)
    unet(x, t, c).sample.pow(2).mean().backward()
    for slot in opt.slots:
        if slot.count:
            assert slot.values.grad is buffers[slot.name]  # filled in place: no gradient allocated per step
            assert slot.param.grad.values is buffers[slot.name]
    # kept between steps, counted as persistent state: 4 bytes per trained entry
    assert state_bytes(opt)["gradient buffers"] == 4 * opt.num_trainable


def test_clipping_and_hand_written_gradients_reach_the_graph(graphs_on_cpu):
    eager, _ = _run(clip=1e-3)
    graphed, opt = _run(clip=1e-3, cuda_graphs=True)
    assert torch.equal(_flat(graphed), _flat(eager))

    def dense_by_hand(unet, opt):  # a .grad set by hand is not the buffer: it is copied in
        for i in range(3):
            x, t, c = _batch(i)
            unet(x, t, c).sample.pow(2).mean().backward()
            for s in opt.slots:
                if s.count:
                    s.param.grad = s.param.grad.to_dense() * 2
            opt.step()
            opt.zero_grad()
        return _flat(unet)

    u1, u2 = build_unet(SMALL_CONFIG, seed=0), build_unet(SMALL_CONFIG, seed=0)
    by_eager = dense_by_hand(u1, SaRAAdamW(u1, **SETTINGS))
    by_graph = dense_by_hand(u2, SaRAAdamW(u2, **SETTINGS, cuda_graphs=True))
    assert torch.equal(by_graph, by_eager)


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, use_b):
        return self.a(x) + (self.b(x) if use_b else 0)


def test_a_weight_without_a_gradient_is_left_alone_and_keys_another_graph(graphs_on_cpu):
    def run(**options):
        model = _TwoBranches()
        opt = SaRAAdamW(model, lr=2.0**-8, fraction=0.5, rank_lambda=0.0, **options)
        for i, use_b in enumerate([True, True, False, False, True, False]):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(i))
            model(x, use_b).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    eager, _ = run()
    graphed, opt = run(cuda_graphs=True)
    assert torch.equal(_flat(graphed), _flat(eager))
    # one graph with b's weights, one without; the second time each is replayed, not captured
    assert opt.graph_stats == {"captures": 2, "replays": 5, "eager": 1}


def test_a_plain_pytorch_resume_captures_anew_and_continues_exactly(graphs_on_cpu, tmp_path):
    straight, _ = _run(cuda_graphs=True)
    unet, opt = _run(steps=4, cuda_graphs=True)
    torch.save({"model": unet.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    # a stranger's order: new model, new optimizer, then both load_state_dict calls
    unet2 = build_unet(SMALL_CONFIG, seed=0)
    opt2 = SaRAAdamW(unet2, **SETTINGS, cuda_graphs=True)
    unet2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    resumed, opt2 = _run(steps=2, unet=unet2, opt=opt2, first=4)
    assert torch.equal(_flat(resumed), _flat(straight))
    assert opt2.graph_stats["captures"] == 1 and opt2.graph_stats["eager"] == 0


@pytest.mark.parametrize("options, words", [
    (dict(cuda_graphs=1), "cuda_graphs must be True or False"),
    (dict(cuda_graphs=True), "on cpu: move the model to 'cuda'"),
])
def test_graphs_on_a_cpu_model_are_refused(options, words):
    unet = build_unet(SMALL_CONFIG, seed=0)
    with pytest.raises(ConfigError, match=words):
        SaRAAdamW(unet, **SETTINGS, **options)
    assert all(p.requires_grad for p in unet.parameters())  # the model was left as it was


@pytest.mark.parametrize("options, words", [
    (dict(compact=True), "does not combine with compact=True"),
    (dict(compiled=True), "does not combine with"),
    (dict(positions="delta"), "positions='delta'"),
    (dict(fused=False), "fused=False"),
])
def test_graphs_refuse_what_they_cannot_capture(graphs_on_cpu, options, words):
    with pytest.raises(ConfigError, match=words):
        SaRAAdamW(build_unet(SMALL_CONFIG, seed=0), **SETTINGS, cuda_graphs=True, **options)


def test_the_course_method_passes_the_option_on():
    unet = build_unet(SMALL_CONFIG, seed=0)
    with pytest.raises(ConfigError, match="cuda_graphs=True captures the step on a CUDA GPU"):
        SaRA(cuda_graphs=True).build_optimizer(unet, lr=1e-4, weight_decay=1e-2, total_steps=4)
    assert SaRAAdamW(unet, **SETTINGS).graph_stats is None
