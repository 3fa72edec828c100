import pandas as pd
import pytest

from sara_edu.errors import ConfigError
from sara_edu.lessons import stable_diffusion_gpu as lesson


def _summary(files=(5.2, 2.6)):
    return pd.DataFrame({"peak memory (MB)": [9800.0, 7100.0], "step time (s, median)": [0.41, 0.33],
                         "saved file (MB)": list(files)}, index=pd.Index(["SaRA", "LoRA"], name="method"))


@pytest.mark.parametrize("files, unet_mb, decades", [
    ((5.2, 2.6), 3279.0, ["1", "10", "100", "1000", "10000"]),  # SD1.5: three decades apart
    ((0.21, 0.12), 1.3, ["0.1", "1"]),  # the tiny stand-in: one decade, where matplotlib labelled every minor tick
])
def test_sd_summary_figure_labels_every_bar_and_one_tick_per_decade_on_the_file_panel(files, unet_mb, decades):
    fig = lesson.plot_sd_summary(_summary(files), full_unet_mb=unet_mb, title="SaRA vs LoRA")
    fig.canvas.draw()
    memory, time, files_panel = fig.axes
    assert [t.get_text() for t in memory.texts] == ["9,800", "7,100"]
    assert [t.get_text() for t in files_panel.texts] == [f"{v:.3g}" for v in files]
    assert files_panel.get_yscale() == "log"
    low, high = files_panel.get_ylim()
    shown = [t.get_text() for t in files_panel.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert shown == decades  # one label per decade
    assert not [t for t in files_panel.yaxis.get_minorticklabels() if t.get_text()]
    assert low < min(files) and high > unet_mb  # every bar and the full-UNet line are inside the panel


def test_sd_summary_figure_refuses_what_it_cannot_draw():
    with pytest.raises(ConfigError, match="saved file"):
        lesson.plot_sd_summary(_summary().drop(columns="saved file (MB)"), full_unet_mb=3279.0)
    with pytest.raises(ConfigError, match="full_unet_mb"):
        lesson.plot_sd_summary(_summary(), full_unet_mb=0)


def test_training_step_time_is_reported_only_where_the_tracker_is_off():
    import math

    import pandas as pd

    from sara_edu.lessons.stable_diffusion_gpu import training_step_time

    history = pd.DataFrame({"step_time_s": [5.0, 1.0, 3.0, 2.0]})
    assert training_step_time(history, "cuda") == 2.0  # the first (warm-up) step is left out
    assert math.isnan(training_step_time(history, "cpu"))  # trained under the memory tracker: not a fair time
    assert math.isnan(training_step_time(history.iloc[:1], "cuda"))
