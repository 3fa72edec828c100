import pandas as pd
import pytest

from sara_edu.errors import ConfigError
from sara_edu.lessons import stable_diffusion_gpu as lesson


def _summary(files=(5.2, 2.6)):
    return pd.DataFrame({"peak memory (MB)": [9800.0, 7100.0], "step time (s, median)": [0.41, 0.33],
                         "saved file (MB)": list(files)}, index=pd.Index(["SaRA", "LoRA"], name="method"))


@pytest.mark.parametrize("files, unet_mb", [((5.2, 2.6), 3279.0), ((0.21, 0.12), 1.3)])  # SD1.5, the tiny stand-in
def test_sd_summary_figure_labels_every_bar_on_linear_axes_from_zero(files, unet_mb):
    fig = lesson.plot_sd_summary(_summary(files), full_unet_mb=unet_mb, title="SaRA vs LoRA")
    fig.canvas.draw()
    memory, time, files_panel = fig.axes
    assert [t.get_text() for t in memory.texts] == ["9,800", "7,100"]
    assert [t.get_text() for t in files_panel.texts] == [f"{v:.3g}\n({v / unet_mb:.1%} of the UNet)" for v in files]
    for ax in fig.axes:  # heights compare as the numbers do: linear, from 0, every bar inside
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        assert ax.get_ylim()[1] > max(p.get_height() for p in ax.patches)
    heights = [p.get_height() for p in files_panel.patches]
    assert heights[0] / heights[1] == pytest.approx(files[0] / files[1])
    assert f"{unet_mb:,.3g} MB" in files_panel.get_title()


def test_sd_summary_figure_refuses_what_it_cannot_draw():
    with pytest.raises(ConfigError, match="saved file"):
        lesson.plot_sd_summary(_summary().drop(columns="saved file (MB)"), full_unet_mb=3279.0)
    with pytest.raises(ConfigError, match="full_unet_mb"):
        lesson.plot_sd_summary(_summary(), full_unet_mb=0)


def test_training_step_time_counts_only_the_steps_the_tracker_did_not_slow():
    import pandas as pd

    from sara_edu.lessons.stable_diffusion_gpu import training_step_time

    history = pd.DataFrame({"step_time_s": [5.0, 9.0, 3.0, 2.0]})
    assert training_step_time(history, "cuda") == 3.0  # the first (warm-up) step is left out
    assert training_step_time(history, "cpu") == 2.5  # the 2 tracked steps are left out (never a NaN)
    assert training_step_time(history, "cpu", tracked_steps=1) == 3.0
    with pytest.raises(ConfigError, match="train at least 3 steps"):
        training_step_time(history.iloc[:2], "cpu")
    with pytest.raises(ConfigError, match="train at least 2 steps"):
        training_step_time(history.iloc[:1], "cuda")


def test_the_tracker_stops_after_the_tracked_steps_and_refuses_a_bad_count(tiny_pipe):
    from sara_edu.measure.memory import MemoryTracker

    tracker = MemoryTracker()
    stop = tracker.stop_after(2)
    with tracker:
        stop(1, None, None)
        assert tracker.active
        stop(2, None, None)
        assert not tracker.active
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="steps must be a positive integer"):
            MemoryTracker().stop_after(bad)