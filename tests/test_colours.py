"""One colour per method: the notebooks and the study's reports draw each method in the same colour."""
from matplotlib.colors import to_hex

from sara_edu.colours import BY_KEY, BY_NAME, OTHER, method_colour


def test_a_method_has_one_colour_by_key_and_by_the_name_a_notebook_shows():
    for name, key in BY_NAME.items():
        assert method_colour(name) == method_colour(key) == BY_KEY[key]
    assert method_colour("sara") == method_colour("SARA") == BY_KEY["sara"]  # case-insensitive
    assert method_colour("no such method") == OTHER
    assert len(set(BY_KEY.values())) == len(BY_KEY), "two methods share a colour"


def test_the_study_and_notebook_04_and_05_use_the_same_colours():
    from sara_edu.lessons.sara_vs_lora import COLOURS
    from sara_edu.study.config import METHOD_LABELS
    from sara_edu.study.figures import _colors

    study = _colors(list(METHOD_LABELS))
    assert study["sara"] == COLOURS["SaRA"] and study["lora_matched"] == COLOURS["LoRA"]
    assert study["full"] == COLOURS["full fine-tuning"]
    assert all(c != OTHER for c in study.values()), "a study method without its colour"


def test_notebook_05s_cost_figure_draws_sara_and_lora_in_their_colours():
    import pandas as pd

    from sara_edu.lessons.stable_diffusion_gpu import SUMMARY_COLUMNS, plot_sd_summary

    summary = pd.DataFrame({c: [2.0, 1.0] for c in SUMMARY_COLUMNS}, index=["SaRA", "LoRA"])
    fig = plot_sd_summary(summary, full_unet_mb=10.0)
    bars = [to_hex(p.get_facecolor()) for p in fig.axes[0].patches]
    assert bars == [method_colour("SaRA"), method_colour("LoRA")]


def test_the_memory_parts_use_no_method_colour():
    """A stacked memory bar in red would read as SaRA's: the parts take colours no method has."""
    from matplotlib.colors import to_hex

    from sara_edu.lessons.sara_vs_lora.figures import MEMORY_COLOURS

    assert not {to_hex(c) for c in MEMORY_COLOURS} & {to_hex(c) for c in BY_KEY.values()}


def test_loss_curves_take_the_method_colour_and_other_runs_each_their_own():
    """Exercise 2 of notebook 03 plots runs named after their fraction: they must not all be the same grey."""
    import pandas as pd

    from sara_edu.lessons.sara_vs_lora import plot_losses

    h = pd.DataFrame({"step": [1, 2, 3], "loss": [0.3, 0.2, 0.1]})
    ax = plot_losses({"SaRA": h, "fraction 0.02": h, "fraction 0.3": h}).axes[0]
    thick = [to_hex(line.get_color()) for line in ax.get_lines()[1::2]]
    assert thick[0] == method_colour("SaRA") and len(set(thick)) == 3 and OTHER not in thick
    assert method_colour("fraction 0.3", default=None) is None
