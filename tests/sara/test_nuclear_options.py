"""The nuclear-norm term's variants: which weights (2-D / convolutions / the authors' filter), ΔW⊙M or W⊙M,
and the authors' moment reset at progressive adjustment."""
import pytest
import torch
from torch import nn

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.sara.nuclear import nuclear_norm_penalty
from sara_edu.sara.optimizer import SaRAAdamW, nuclear_matrix_shape


class Net(nn.Module):
    """A convolution, a matrix with min side 80 (> 64) and one with min side 8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.big = nn.Linear(96, 80)
        self.small = nn.Linear(80, 8)

    def forward(self, x):
        h = self.conv(x).flatten(1)[:, :96]
        return self.small(torch.tanh(self.big(h)))


def _net():
    torch.manual_seed(0)
    return Net().double()


def _steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_matrix_shapes_per_target_kind():
    assert nuclear_matrix_shape((80, 96), "2d") == (80, 96)
    assert nuclear_matrix_shape((6, 3, 3, 3), "2d") is None
    assert nuclear_matrix_shape((6, 3, 3, 3), "conv") == (6, 27)
    assert nuclear_matrix_shape((8, 80), "authors") is None  # min(shape) > 64 only
    assert nuclear_matrix_shape((65, 80), "authors") == (65, 80)
    assert nuclear_matrix_shape((80,), "conv") is None  # biases are not matrices


@pytest.mark.parametrize("targets, eligible", [("2d", {"big.weight", "small.weight"}),
                                               ("conv", {"conv.weight", "big.weight", "small.weight"}),
                                               ("authors", {"big.weight"})])
def test_the_term_picks_only_its_targets(targets, eligible):
    model = _net()
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.3, rank_lambda=0.1, nuclear_targets=targets)
    assert {s.name for s in opt.eligible_for_nuclear()} == eligible
    picked = set()
    for _ in range(30):
        _steps(model, opt, 1)
        picked.add(opt.last_nuclear["name"])
    assert picked == eligible
    assert set(nuclear_norm_penalty(opt, per_layer=True).name) == eligible


@pytest.mark.parametrize("of", ["update", "weights"])
def test_the_gradient_is_lambda_times_the_nuclear_subgradient_of_the_chosen_matrix(of):
    """Against autograd of torch's nuclear norm, on a convolution read as out x (in*kh*kw)."""
    model = _net()
    opt = SaRAAdamW(model, lr=1e-3, fraction=0.3, rank_lambda=0.3, nuclear_targets="conv", nuclear_of=of,
                    seed=0)
    _steps(model, opt, 3)  # the values have moved: ΔW⊙M != 0
    slot = next(s for s in opt.slots if s.name == "conv.weight")
    assert (slot.initial is None) == (of == "weights")  # W⊙M needs no starting values
    start = {"update": slot.initial, "weights": None}[of]
    for s in opt.slots:
        s.values.grad = None
    opt._rng.choice = lambda eligible: slot  # pick the convolution
    opt._add_nuclear_grad()
    dense = torch.zeros(slot.param.numel(), dtype=torch.float64)
    values = slot.param.detach().reshape(-1)[slot.idx.long()]
    dense[slot.idx.long()] = values if start is None else values - start
    D = dense.view(6, 27).requires_grad_(True)
    torch.linalg.matrix_norm(D, "nuc").backward()
    torch.testing.assert_close(slot.values.grad, 0.3 * D.grad.reshape(-1)[slot.idx.long()], rtol=0, atol=1e-9)
    assert opt.last_nuclear["nuclear_norm"] == pytest.approx(torch.linalg.matrix_norm(D.detach(), "nuc").item())


@pytest.mark.parametrize("compact", [False, True])
def test_reset_moments_restarts_adam_for_the_continuing_entries(compact):
    runs = {}
    for reset in (False, True):
        model = _net()
        opt = SaRAAdamW(model, lr=5e-3, fraction=0.3, rank_lambda=0.0, progressive_iter=3, reset_moments=reset,
                        compact=compact, weight_decay=0.0)
        _steps(model, opt, 3)  # progressive adjustment after step 3
        states = [opt.state[s.values] for s in opt.slots if s.count]
        assert states and all((len(st) == 0) == reset for st in states)
        _steps(model, opt, 1, seed=3)
        steps = {float(opt.state[s.values]["step"]) for s in opt.slots if s.count}
        assert steps == ({1.0} if reset else {4.0})
        runs[reset] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert not torch.equal(runs[False], runs[True])  # a fresh bias correction moves the entries differently


def test_resume_keeps_the_options_and_refuses_other_ones():
    model = _net()
    kw = dict(lr=1e-3, fraction=0.3, rank_lambda=0.1, nuclear_targets="conv", nuclear_of="weights",
              reset_moments=True, progressive_iter=4)
    opt = SaRAAdamW(model, **kw)
    _steps(model, opt, 2)
    state = opt.state_dict()
    assert opt.config()["nuclear_of"] == "weights"
    opt.detach()
    again = SaRAAdamW(model, **kw)
    again.load_state_dict(state)
    assert again.steps_done == 2
    again.detach()
    with pytest.raises(CheckpointError, match="nuclear_of='weights'.*create it with the checkpoint's options"):
        SaRAAdamW(model, **{**kw, "nuclear_of": "update"}).load_state_dict(state)
    with pytest.raises(CheckpointError, match="nuclear_via='adam'"):
        SaRAAdamW(model, **{**kw, "nuclear_via": "direct"}).load_state_dict(state)
    old = {**state, "sara": {**state["sara"], "nuclear": {k: v for k, v in state["sara"]["nuclear"].items()
                                                          if k != "via"}}}
    SaRAAdamW(model, **kw).load_state_dict(old)  # a checkpoint from before the option: its default, "adam"


@pytest.mark.parametrize("kw, match", [({"nuclear_targets": "all"}, "nuclear_targets must be one of"),
                                       ({"nuclear_of": "delta"}, "nuclear_of must be 'update'"),
                                       ({"reset_moments": "yes"}, "reset_moments must be True or False"),
                                       ({"nuclear_via": "sgd"}, "nuclear_via must be 'adam'")])
def test_bad_options_name_the_argument(kw, match):
    with pytest.raises(ConfigError, match=match):
        SaRAAdamW(_net(), lr=1e-3, fraction=0.3, **kw)


@pytest.mark.parametrize("compact", [False, True])
def test_direct_nuclear_step_is_adamw_without_the_term_then_minus_lr_lambda_uv(compact):
    """nuclear_via="direct": AdamW and its moments never see the term; the values then move by −lr·λ·(U·Vᵀ)[M]
    of the matrix chosen that step (measured from the values before the step)."""
    lr, lam = 1e-2, 0.3
    direct_model, plain_model = _net(), _net()
    direct = SaRAAdamW(direct_model, lr=lr, fraction=0.3, rank_lambda=lam, nuclear_via="direct", compact=compact,
                       moments="fp32", nuclear_method="svd")
    plain = SaRAAdamW(plain_model, lr=lr, fraction=0.3, rank_lambda=0.0, compact=compact, moments="fp32")
    _steps(direct_model, direct, 2)
    _steps(plain_model, plain, 2)
    # step 1 penalised ΔW = 0 (no direction): the runs differ only by step 2's term, on one matrix
    name = direct.last_nuclear["name"]
    slot = next(s for s in direct.slots if s.name == name)
    gap = {n: (dict(plain_model.named_parameters())[n] - p).detach() for n, p in direct_model.named_parameters()}
    assert all(g.abs().max() == 0 for n, g in gap.items() if n != name)
    # the term of step 2 from the state after step 1, which both runs share (AdamW ignored the term)
    replay_model = _net()
    replay = SaRAAdamW(replay_model, lr=lr, fraction=0.3, rank_lambda=0.0, compact=compact, moments="fp32")
    _steps(replay_model, replay, 1)
    from sara_edu.sara.nuclear import nuclear_norm_grad

    w = dict(replay_model.named_parameters())[name].detach()
    start = dict(_net().named_parameters())[name].detach()
    delta = torch.zeros_like(w).reshape(-1)
    idx = slot.idx.long()
    delta[idx] = (w - start).reshape(-1)[idx]
    G, _ = nuclear_norm_grad(delta.view(nuclear_matrix_shape(w.shape, "2d")), "svd")
    want = torch.zeros_like(delta)
    want[idx] = lr * lam * G.reshape(-1)[idx]
    torch.testing.assert_close(gap[name].reshape(-1), want, rtol=1e-9, atol=1e-15)
    assert want.abs().max() > 0
    # through AdamW (the default) the same term moves the values by a different amount
    adam_model = _net()
    _steps(adam_model, SaRAAdamW(adam_model, lr=lr, fraction=0.3, rank_lambda=lam, compact=compact, moments="fp32",
                                 nuclear_method="svd"), 2)
    assert not torch.equal(dict(adam_model.named_parameters())[name], dict(direct_model.named_parameters())[name])
