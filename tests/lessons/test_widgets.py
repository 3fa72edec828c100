import matplotlib.pyplot as plt
import pytest

from sara_edu.errors import ConfigError
from sara_edu.lessons import widgets


def _recorder():
    calls = []

    def draw(x, mode, scale=1.0):
        calls.append((x, mode, scale))
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, x * scale])
        ax.set_title(mode)
        return fig

    return draw, calls


def test_headless_call_runs_once_with_defaults_and_never_needs_a_front_end():
    draw, calls = _recorder()
    assert not widgets.front_end_possible()  # plain pytest: no kernel
    view = widgets.interactive_or_static(draw, x=widgets.slider(2.0, 0.0, 5.0), mode=widgets.dropdown(["a", "b"]),
                                         scale=3.0)
    assert calls == [(2.0, "a", 3.0)]
    assert view.values == {"x": 2.0, "mode": "a", "scale": 3.0}
    assert len(view.items) == 1 and view.items[0].axes[0].get_title() == "a"


def test_moving_a_control_recomputes_through_the_observer():
    draw, calls = _recorder()
    view = widgets.interactive_or_static(draw, x=widgets.slider(1, 0, 10), mode="fixed")
    view.controls["x"].value = 7  # what a student dragging the slider does
    assert calls[-1] == (7, "fixed", 1.0) and view.calls == 2
    view.update(x=3, mode="other")  # several at once: one redraw
    assert calls[-1] == (3, "other", 1.0) and view.calls == 3
    with pytest.raises(ConfigError, match="unknown control"):
        view.update(y=1)


def test_errors_after_a_slider_moves_are_kept_not_raised_into_the_void():
    def fragile(x):
        if x > 5:
            raise ValueError("too big")
        return f"x = {x}"

    view = widgets.interactive_or_static(fragile, x=widgets.slider(1, 0, 10))
    assert view.result == "x = 1"
    view.controls["x"].value = 9  # the observer must not raise
    assert isinstance(view.error, ValueError)
    with pytest.raises(ValueError, match="too big"):
        view.update(x=8)
    view.update(x=2)
    assert view.error is None and view.result == "x = 2"


def test_errors_in_the_first_call_propagate():
    def broken(x):
        raise RuntimeError("bad default")

    with pytest.raises(RuntimeError, match="bad default"):
        widgets.interactive_or_static(broken, x=widgets.slider(1, 0, 2))


def test_without_ipywidgets_everything_still_runs(monkeypatch):
    monkeypatch.setattr(widgets, "_ipywidgets", lambda: None)
    s = widgets.slider(0.1, 0.0, 1.0)
    d = widgets.dropdown(["p", "q"], "q")
    assert isinstance(s, widgets.StaticControl) and s.value == 0.1 and d.value == "q"
    draw, calls = _recorder()
    view = widgets.interactive_or_static(draw, x=s, mode=d)
    assert calls == [(0.1, "q", 1.0)] and view.box is None
    view.update(x=0.5)
    assert calls[-1] == (0.5, "q", 1.0)


def test_slider_kinds_and_validation():
    import ipywidgets

    log = widgets.slider(2e-3, 1e-5, 1e-1, log=True, description="θ")
    assert isinstance(log, ipywidgets.FloatLogSlider)
    assert log.value == pytest.approx(2e-3) and log.min == pytest.approx(-5) and log.max == pytest.approx(-1)
    assert isinstance(widgets.slider(3, 1, 10), ipywidgets.IntSlider)
    f = widgets.slider(0.1, 0.0, 0.5, 0.05)
    assert isinstance(f, ipywidgets.FloatSlider) and f.step == pytest.approx(0.05) and not f.continuous_update
    with pytest.raises(ConfigError):
        widgets.slider(5, 0, 1)
    with pytest.raises(ConfigError):
        widgets.slider(0.1, 0, 1, log=True)
    with pytest.raises(ConfigError):
        widgets.dropdown(["a"], "b")
    with pytest.raises(ConfigError):
        widgets.dropdown([])


def test_returning_none_shows_the_figures_fn_created_and_tuples_show_all_items():
    def draws_only(x):
        plt.subplots()

    view = widgets.interactive_or_static(draws_only, x=widgets.slider(1, 0, 2))
    assert len(view.items) == 1 and hasattr(view.items[0], "savefig")

    def many(x):
        return "some *markdown*", {"x": x}

    view = widgets.interactive_or_static(many, x=widgets.slider(1, 0, 2))
    assert view.items == ["some *markdown*", {"x": 1}]


def test_static_output_of_the_controls_is_a_readable_note():
    view = widgets.interactive_or_static(lambda x: None, x=widgets.slider(1, 0, 2))
    bundle = widgets._Controls(view.box)._repr_mimebundle_()
    assert bundle["text/plain"] == widgets.STATIC_TEXT
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_inside_an_ipython_shell_outputs_are_displayed_with_ids_and_updated_in_place(monkeypatch):
    """Simulate a kernel: display() returns handles; a slider move must update them, not add outputs."""
    import IPython.display

    shown, updated = [], []

    class Handle:
        def __init__(self, obj):
            self.obj = obj

        def update(self, obj):
            updated.append(obj)

    def fake_display(obj, display_id=None, **kw):
        shown.append(obj)
        return Handle(obj) if display_id else None

    class FakeShell:
        kernel = object()

    monkeypatch.setattr(widgets, "_ipython_shell", lambda: FakeShell())
    monkeypatch.setattr(IPython.display, "display", fake_display)
    draw, calls = _recorder()
    view = widgets.interactive_or_static(draw, x=widgets.slider(1.0, 0.0, 2.0), mode="m")
    assert isinstance(shown[0], widgets._Controls)  # controls first
    assert isinstance(shown[1], IPython.display.Image)  # then the default figure, as a plain PNG output
    assert shown[1].data.startswith(b"\x89PNG") and "image/png" in shown[1]._repr_mimebundle_()[0]
    assert plt.get_fignums() == []  # closed, so the inline backend does not draw it twice
    view.controls["x"].value = 2.0
    assert len(updated) == 1 and calls[-1] == (2.0, "m", 1.0)
    assert isinstance(updated[0], IPython.display.Image) and updated[0].data != shown[1].data  # the new figure
    # a slider move also draws into the box's Output widget (it survives a page reload, the display id does not),
    # then the rule that hides the static copy below the box: only in this view's cell, and after the figure
    live, hide = shown[2:]
    assert isinstance(live, IPython.display.Image) and live.data == updated[0].data
    assert isinstance(hide, IPython.display.HTML) and f".{view.mark}" in hide.data and "display: none" in hide.data
    assert view.mark in view.box._dom_classes
    view.update(x=1.5)  # code, not a front end: the static outputs only
    assert len(shown) == 4 and len(updated) == 2


def test_a_failing_redraw_leaves_no_half_drawn_figure_behind():
    def draw(x):
        fig, ax = plt.subplots()
        if x > 1:
            raise ValueError("<bad> value")
        return fig

    view = widgets.interactive_or_static(draw, x=widgets.slider(1, 0, 3))
    open_before = plt.get_fignums()
    view.controls["x"].value = 2
    assert plt.get_fignums() == open_before and isinstance(view.error, ValueError)
    assert "&lt;bad&gt;" in view._status.value  # the message is shown, escaped, under the controls


def test_controls_of_one_view_share_a_label_width_so_the_tracks_line_up():
    view = widgets.interactive_or_static(
        lambda seed, guidance_scale, tensor: None,
        seed=widgets.slider(0, 0, 10, description="seed"),
        guidance_scale=widgets.slider(3.0, 0.0, 8.0, 0.5, description="guidance scale"),
        tensor=widgets.dropdown(["a.b", "a.c"], description="tensor"))
    seed, guidance, tensor = view.controls.values()
    assert seed.style.description_width == guidance.style.description_width == tensor.style.description_width
    assert seed.style.description_width == f"{len('guidance scale') + 1}ch"  # the longest label fits
    assert seed.layout.width == guidance.layout.width  # same label + same track = same place on the page


def test_long_dropdown_labels_keep_the_part_that_tells_them_apart():
    names = [f"up_blocks.1.attentions.{a}.transformer_blocks.0.ff.net.{n}.weight" for a in (0, 1) for n in (0, 2)]
    assert widgets.option_labels(names) == names  # short enough: shown whole
    short = widgets.option_labels(names, max_chars=40)
    assert short[0] == "…0.transformer_blocks.0.ff.net.0.weight"  # the shared "up_blocks.1.attentions." goes
    assert widgets.option_labels(names[2:], max_chars=40) == ["…0.weight", "…2.weight"]
    long = ["a" * 30 + ".x", "b" * 30 + ".y"]
    assert widgets.option_labels(long, max_chars=20) == ["…" + long[0][-19:], "…" + long[1][-19:]]  # the tails
    assert len(set(widgets.option_labels(names, max_chars=20))) == 4  # tails alike: longer labels, never equal
    assert len(set(short)) == len(names) and all(len(label) <= 40 for label in short)
    assert all(name.endswith(label.lstrip("…")) for name, label in zip(names, short))
    menu = widgets.dropdown(names, names[3], description="matrix")
    assert menu.value == names[3] and menu.label == names[3]  # the value passed on is the full name
    assert f"{len(names[0]) + 2}ch" in menu.layout.width  # wide enough for the longest label


def test_the_status_line_keeps_its_height_and_errors_stay_on_one_line():
    def fragile(x):
        if x > 1:
            raise ValueError("<bad> " + "value " * 40)
        return "fine"

    view = widgets.interactive_or_static(fragile, x=widgets.slider(1, 0, 3))
    assert view._status.layout.height == widgets.STATUS_HEIGHT and view._status.layout.overflow == "hidden"
    view.controls["x"].value = 2
    assert "nowrap" in view._status.value and "&lt;bad&gt;" in view._status.value
    view.controls["x"].value = 0
    assert view._status.value == "" and view._status.layout.height == widgets.STATUS_HEIGHT
