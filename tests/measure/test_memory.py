"""The CPU memory tracker against bytes counted by hand (float32: 4 bytes a number)."""
import time

import pytest
import torch
from torch import nn

from sara_edu.errors import ConfigError
from sara_edu.measure.memory import (
    CATEGORIES,
    MB,
    MemoryTracker,
    memory_table,
    tensor_bytes,
)
from sara_edu.measure.timing import measure_step_time
from sara_edu.training.loop import train
from sara_edu.training.method import FullFineTuning, TrainingMethod
from sara_edu.world.data import StyleDataset


def test_a_known_size_tensor_and_its_release():
    with MemoryTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float64)
        assert tracker.current_bytes == tracker.peak_bytes == 8000
        b = torch.ones(10, 10)  # 400 bytes
        assert tracker.current_bytes == tracker.peak_bytes == 8400
        del a
        assert tracker.current_bytes == 400 and tracker.peak_bytes == 8400
        del b
    assert tracker.current_bytes == 0 and tracker.peak_bytes == 8400


def test_views_and_in_place_ops_are_not_counted_twice():
    before = torch.randn(50)
    with MemoryTracker() as tracker:
        a = torch.zeros(1000)
        views = [a[:500], a.view(10, 100), a.view(10, 100).t(), a.unsqueeze(0), a.detach()]
        a.add_(1).mul_(2)
        _ = before.view(5, 10), before[3:]  # views of a tensor from before the block: nothing new
        assert tracker.current_bytes == 4000
        del a
        assert tracker.current_bytes == 4000  # the views keep the storage alive
        views.clear()
        assert tracker.current_bytes == 0


def test_linear_forward_and_backward_exactly():
    lin = nn.Linear(64, 32)
    x, g = torch.randn(16, 64), torch.randn(16, 32)
    with MemoryTracker() as tracker:
        y = lin(x)  # the output: 16 x 32
        assert tracker.current_bytes == 16 * 32 * 4
        y.backward(g)  # weight grad 32 x 64 + bias grad 32; x needs no grad
        grads = (32 * 64 + 32) * 4
        assert tracker.current_bytes == tracker.peak_bytes == 16 * 32 * 4 + grads
        del y
        assert tracker.current_bytes == grads == tensor_bytes([lin.weight.grad, lin.bias.grad])


def test_allocations_of_the_autograd_engine_are_seen():
    lin = nn.Linear(64, 32)
    loss = lin(torch.randn(16, 64)).square().mean()  # graph built before tracking
    with MemoryTracker() as tracker:
        loss.backward()  # only the engine runs inside the block
    assert tracker.current_bytes == (32 * 64 + 32) * 4
    assert tracker.peak_bytes >= tracker.current_bytes + 16 * 32 * 4  # plus the output-sized grads


def test_adamw_state_is_exactly_two_copies_plus_step_counters():
    lin = nn.Linear(64, 32)
    weights = (32 * 64 + 32) * 4
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    with MemoryTracker() as tracker:
        tracker.watch(opt)
        for _ in range(2):
            lin(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    step_counters = 2 * 4  # one float32 scalar per parameter tensor
    assert tracker.current_bytes == 2 * weights + step_counters
    report = tracker.report(lin, opt)
    assert report.optimizer_state == 2 * weights + step_counters
    assert report.trainable_values == weights  # existed before: not in peak_bytes, but trained
    assert report.gradients == weights
    assert report.frozen_weights == 0 and report.method_buffers == 0
    assert report.peak_above_frozen == tracker.peak_bytes + weights
    assert sum(getattr(report, c) for c in CATEGORIES) == report.peak_above_frozen


def test_breakdown_separates_frozen_from_trainable_and_new_parameters():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    model[0].requires_grad_(False)
    frozen, trained = (64 * 32 + 32) * 4, (32 * 16 + 16) * 4
    with MemoryTracker(model=model) as tracker:
        model.append(nn.Linear(16, 8))  # created inside the block, like a LoRA adapter
        new = (16 * 8 + 8) * 4
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        tracker.watch(opt)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    r = tracker.report(model, opt)
    assert r.frozen_weights == frozen
    assert r.trainable_values == trained + new
    assert r.optimizer_state == 2 * (trained + new) + 4 * 4
    assert r.peak_above_frozen == tracker.peak_bytes + trained
    table = memory_table({"toy": r})
    assert set(table.columns) == {"method", "category", "MB"}
    assert table.MB.sum() * MB == pytest.approx(r.peak_above_frozen)


def test_plot_of_the_breakdown():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from sara_edu.measure.memory import MemoryReport, plot_memory_breakdown

    reports = {"a": MemoryReport(10 * MB, 0, 1 * MB, 2 * MB, 3 * MB, 0, 4 * MB),
               "b": MemoryReport(2 * MB, 5 * MB, 0, 0, 0, 1 * MB, 1 * MB)}
    ax = plot_memory_breakdown(reports)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0)
    assert heights == [1, 1, 1, 2, 3, 4]
    # the benchmark's CSV (wide, one row per method) gives the same long table
    columns = ["trainable values (MB)", "optimizer state (MB)", "gradients (MB)", "method buffers (MB)",
               "activations + transients (MB)"]  # as benchmarks/memory_time.py writes them
    wide = pd.DataFrame([["m", "a", 1, 2, 3, 0, 4], ["m", "b", 0, 0, 0, 1, 1]], columns=["model", "method"] + columns)
    order = ["method", "category"]
    pd.testing.assert_frame_equal(memory_table(wide).drop(columns="model").sort_values(order).reset_index(drop=True),
                                  memory_table(reports).sort_values(order).reset_index(drop=True), check_dtype=False)


def test_a_method_buffer_replaced_after_the_peak_still_counts():
    """Like SaRA's progressive re-selection: bookkeeping made at attach, replaced later."""

    class Bookkeeping(TrainingMethod):
        def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
            self.positions = torch.zeros(1000)  # 4000 bytes of "selection" made when attaching
            return torch.optim.AdamW(unet.parameters(), lr=lr)

    lin = nn.Linear(64, 32)
    weights = (32 * 64 + 32) * 4
    tracker = MemoryTracker(model=lin)
    method = tracker.watching(Bookkeeping())
    with tracker:
        opt = method.build_optimizer(lin, lr=1e-3, weight_decay=0.0, total_steps=2)
        for batch in (64, 4):  # the big first step holds the peak
            x = torch.randn(batch, 64)
            lin(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.positions = torch.zeros(500)  # replaced after step 1 (2000 bytes)
    r = tracker.report(lin)
    assert r.method_buffers == 4000  # the one alive at the peak, although freed since
    assert r.trainable_values == weights and r.optimizer_state == 2 * weights + 2 * 4


def test_tracker_in_the_training_loop(tiny_pipe):
    unet = tiny_pipe.unet
    params = list(unet.parameters())
    weights = tensor_bytes(params)
    ds = StyleDataset(None, digits=[3], limit_per_digit=8)
    with MemoryTracker(model=unet) as tracker:
        h = train(tiny_pipe, ds, tracker.watching(FullFineTuning()), steps=2, batch_size=4, progress=False,
                  memory_tracker=tracker)
    assert h.peak_memory_mb.iloc[-1] == pytest.approx(tracker.peak_bytes / MB)
    # full fine-tuning holds gradients and two AdamW moments of every weight at once
    assert tracker.peak_bytes >= 3 * weights
    report = tracker.report(unet)  # the tracker kept the optimizer it watched
    assert report.frozen_weights == 0 and report.trainable_values == weights
    assert report.optimizer_state == 2 * weights + 4 * len(params)
    assert report.gradients <= weights  # (the peak may be at the end of the forward pass, before any)
    assert sum(getattr(report, c) for c in CATEGORIES) == report.peak_above_frozen


def test_stop_ends_counting_but_keeps_subtracting():
    tracker = MemoryTracker().__enter__()
    a = torch.ones(100)
    tracker.stop()
    tracker.stop()  # idempotent
    b = torch.ones(1000)
    assert tracker.current_bytes == 400
    del a
    assert tracker.current_bytes == 0 and tracker.peak_bytes == 400
    with pytest.raises(ConfigError):
        with tracker:
            pass
    del b


def test_measure_step_time_is_the_median_after_warmup():
    durations = iter([0.3, 0.3, 0.01, 0.05, 0.02])  # two slow warm-up calls, then 10, 50, 20 ms
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(durations))

    t = measure_step_time(fn, warmup=2, repeats=3)
    assert len(calls) == 5
    assert 0.015 <= t < 0.045
    with pytest.raises(ConfigError):
        measure_step_time(fn, repeats=0)


def test_compare_step_times_interleaves_excludes_warmup_and_reports_ratios():
    import time as _time

    from sara_edu.measure.timing import compare_step_times

    calls = []

    def busy(name, seconds):
        def step():
            calls.append(name)
            end = _time.process_time() + seconds
            while _time.process_time() < end:
                pass
        return step

    table = compare_step_times({"fast": busy("fast", 0.002), "slow": busy("slow", 0.02)}, repeats=3, warmup=1,
                               reference="fast")
    assert calls[:4] == ["fast", "slow", "slow", "fast"]  # each round starts with another method
    assert len(calls) == 8  # 1 warm-up + 3 counted rounds, 2 methods
    assert table.loc["slow", "ratio"] > 5 and table.loc["fast", "ratio"] == 1.0
    assert (table.clock == "process CPU").all()
    with pytest.raises(ConfigError, match="reference"):
        compare_step_times({"a": lambda: None}, reference="b")


def test_live_bytes_counts_what_the_optimizer_keeps_between_steps():
    from torch import nn

    from sara_edu.measure.memory import MemoryTracker

    model = nn.Linear(64, 32)
    with MemoryTracker(model=model) as tracker:
        opt = torch.optim.AdamW(model.parameters())
        tracker.watch(opt)
        leftover = torch.ones(1000)  # made during the step, not classified: not state
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        live = tracker.live_bytes(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert live["optimizer_state"] == 2 * 4 * n + 2 * 4  # exp_avg, exp_avg_sq, step counters
    assert live["trainable_values"] == 0  # the weights existed before: not created by the method
    assert leftover.numel() and live["activations_transients"] == 0
