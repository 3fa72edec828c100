from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest
import torch

from sara_edu.errors import ConfigError
from sara_edu.lessons import display, notebook, welcome


@pytest.mark.parametrize("value, quick", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False),
                                          ("no", False)])
def test_choose_follows_the_environment(monkeypatch, value, quick):
    monkeypatch.setenv("SARA_EDU_QUICK", value)
    assert notebook.is_quick() is quick
    assert notebook.choose(quick=5, full=25) == (5 if quick else 25)
    assert notebook.setting_banner(steps=5).startswith("QUICK" if quick else "FULL")
    assert "steps=5" in notebook.setting_banner(steps=5)


def test_choose_is_keyword_only():
    with pytest.raises(TypeError):
        notebook.choose(5, 25)


def test_environment_report_names_what_matters_in_a_table():
    report = notebook.environment_report()
    assert list(report.columns) == ["value"] and report.index.name == "item"
    for key in ("device", "gpu", "torch", "diffusers", "peft", "shipped model folder", "shipped model present",
                "QUICK setting", "python executable"):
        assert key in report.index
    value = report["value"]
    assert value["torch"] == torch.__version__
    assert value["device"] in ("cpu", "cuda", "mps")
    assert (value["gpu"] == "none") == (not torch.cuda.is_available())
    html = report._repr_html_()  # what Jupyter shows: a table with a header, not "dtype: object" text
    assert "<table" in html and "<th>value</th>" in html and "dtype" not in html


def test_locate_course_names_the_package_and_the_model(monkeypatch, tmp_path):
    from sara_edu.errors import CheckpointError
    from sara_edu.world import paths

    line = notebook.locate_course()
    assert f"from {Path(notebook.__file__).resolve().parents[1]}" in line
    assert f"course model: {paths.PRETRAINED_DIR}" in line
    monkeypatch.setattr(paths, "PRETRAINED_DIR", tmp_path / "tiny_diffusion")
    with pytest.raises(CheckpointError, match=r"not in .*tiny_diffusion.*pip install sara-edu.*make data"):
        notebook.locate_course()
    assert notebook.locate_course(needs_model=False).endswith("course model: missing")


def test_progress_bars_become_plain_text_that_a_saved_notebook_keeps(monkeypatch):
    import io

    import tqdm.auto
    from tqdm.notebook import tqdm as widget_tqdm

    monkeypatch.setattr(tqdm.auto, "tqdm", widget_tqdm)  # what a Jupyter kernel gets
    notebook.use_text_progress_bars()
    from tqdm.auto import tqdm as bar, trange

    assert not issubclass(bar, widget_tqdm)
    out = io.StringIO()
    for _ in bar(range(3), desc="training", file=out):
        pass
    assert "training: 100%" in out.getvalue() and "3/3" in out.getvalue()
    assert list(trange(2, file=io.StringIO())) == [0, 1]


def test_to_display_maps_minus_one_one_to_zero_one():
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    out = display.to_display(images)
    assert out.shape == (2, 2, 2, 3)
    assert np.allclose(out[0, :, :, 0], [[0.0, 0.5], [1.0, 1.0]])  # clipped above 1
    with pytest.raises(ConfigError):
        display.to_display(torch.zeros(2, 5, 4, 4))


def test_show_images_grid():
    images = torch.rand(7, 3, 16, 16) * 2 - 1
    fig = display.show_images(images, titles=list("abcdefg"), nrow=4, suptitle="demo", row_labels=["r1", "r2"])
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 8 and len(drawn) == 7
    assert drawn[2].get_title() == "c" and fig.axes[4].get_ylabel() == "r2"
    assert np.allclose(drawn[0].images[0].get_array(), display.to_display(images[:1])[0])
    with pytest.raises(ConfigError):
        display.show_images(images, titles=["too few"])
    with pytest.raises(ConfigError):
        display.show_images(images[:0])


def test_seed_everything_makes_runs_repeat():
    notebook.seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    notebook.seed_everything(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert torch.equal(torch.rand(2, generator=notebook.torch_generator(1)), torch.rand(2, generator=notebook.torch_generator(1)))
    with pytest.raises(ConfigError):
        notebook.seed_everything(-1)


def test_timed_measures(capsys):
    with notebook.timed("nap") as t:
        pass
    assert t.seconds >= 0 and "nap:" in capsys.readouterr().out


def test_sara_overview_figure_has_four_labelled_panels(tiny_pipe):
    fig = welcome.sara_overview_figure()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and all(ax.get_title() for ax in panels)
    weight = tiny_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
    fig = welcome.sara_overview_figure(weight, fraction=0.2, size=10)
    mask = panels_mask = [ax for ax in fig.axes if ax.images][1].images[0].get_array()
    assert mask.shape == (10, 10) and int(np.asarray(panels_mask).sum()) == 20  # exactly the smallest 20%
    with pytest.raises(ConfigError):
        welcome.sara_overview_figure(torch.zeros(4, 4), size=12)
    # SaRA's own θ, one for the whole model: the mask is |w| < θ, whatever share of the corner that is
    fig = welcome.sara_overview_figure(weight, theta=0.05, theta_from="a test θ", size=10)
    mask = [ax for ax in fig.axes if ax.images][1].images[0].get_array()
    corner = weight.detach().reshape(len(weight), -1)[:10, :10].abs()
    assert np.array_equal(np.asarray(mask), (corner < 0.05).numpy()) and "a test θ" in fig.axes[0].get_title()
    for bad in (0, -1.0, "0.1"):
        with pytest.raises(ConfigError, match="theta must be a positive number"):
            welcome.sara_overview_figure(weight, theta=bad)
    with pytest.raises(ConfigError, match="no entry"):
        welcome.sara_overview_figure(weight, theta=1e-12)


def test_notebook_00s_picture_uses_the_unets_single_theta_and_its_answer_counts_right():
    """The answer under 00's prediction quotes the count panel 2 shows with the global θ (the shipped model)."""
    import re

    import nbformat

    import sara_edu
    from sara_edu.sara import select_parameters
    from sara_edu.world.paths import REPO_ROOT

    nb = nbformat.read(REPO_ROOT / "notebooks" / "00_welcome.ipynb", as_version=4)
    code = next(c.source for c in nb.cells if "sara_overview_figure" in c.source)
    assert "theta=THETA" in code and 'fraction=0.1).extra["global_threshold"]' in code
    pipe = sara_edu.load_pretrained()
    theta = select_parameters(pipe.unet, fraction=0.1).extra["global_threshold"]
    w = pipe.unet.mid_block.resnets[0].conv1.weight.detach()
    count = int((w.reshape(len(w), -1)[:12, :12].abs() < theta).sum())
    share = float((w.abs() < theta).float().mean())
    answer = next(c.source for c in nb.cells if "Check your prediction" in c.source and "144" in c.source)
    assert f"panel 2 trains {count}" in answer and f"Only the {count} trained values" in answer
    assert f"has {share:.0%} of its entries below θ" in answer


def test_strip_notebook_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    cell.execution_count = 4
    nb.cells = [nbformat.v4.new_markdown_cell("# hi"), cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}  # saved by `make lab`
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert notebook.strip_notebook_outputs([path]) == [path]
    back = nbformat.read(path, as_version=4)
    assert back.cells[1].outputs == [] and back.cells[1].execution_count is None
    assert "widgets" not in back.metadata
    assert notebook.strip_notebook_outputs([path]) == []  # already clean: untouched


def test_sample_figure_one_column_per_digit(tiny_pipe):
    fig = display.sample_figure(tiny_pipe, digits=(1, 7), n_per_digit=2, steps=2, seed=3)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 4 and drawn[1].get_title() == "'7'" and "seeds 3...6" in fig.get_suptitle()
    from sara_edu.world.model import generate

    expected = generate(tiny_pipe, ["a digit 1", "a digit 7", "a digit 1", "a digit 7"], steps=2, seed=3)
    assert np.allclose(drawn[3].images[0].get_array(), display.to_display(expected[3:])[0])
    with pytest.raises(ConfigError):
        display.sample_figure(tiny_pipe, digits=())


def test_setup_notebook_seeds_sets_display_and_names_the_setting(monkeypatch, capsys):
    import pandas as pd
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # setup_notebook swaps it: restore afterwards
    monkeypatch.setenv("SARA_EDU_QUICK", "1")
    with matplotlib.rc_context():
        try:
            assert notebook.setup_notebook(seed=5, steps=10) is None
            a = torch.rand(2)
            assert pd.get_option("display.float_format")(0.000123456) == "0.0001235"
        finally:
            pd.reset_option("display.float_format")
    notebook.seed_everything(5)
    assert torch.equal(a, torch.rand(2))
    out = capsys.readouterr().out
    assert out.startswith("QUICK") and "steps=10" in out
    lines = out.splitlines()
    assert lines[1].startswith("sara_edu ") and lines[2].startswith("course model:")  # one path per line


def test_say_wraps_long_lines_between_words_and_keeps_short_ones():
    from sara_edu.lessons.notebook import PRINT_WIDTH, say, wrap

    text = "word " * 60 + "\nshort line"
    out = wrap(text)
    lines = out.split("\n")
    assert all(len(ln) <= PRINT_WIDTH for ln in lines) and lines[-1] == "short line"
    assert all(w == "word" for ln in lines[:-1] for w in ln.split())  # never cut inside a word
    assert wrap("/a/" + "x" * 150) == "/a/" + "x" * 150  # one long word stays whole
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        say("a", "b" * 120, "c")
    assert buffer.getvalue() == "a\n  " + "b" * 120 + "\n  c\n"
