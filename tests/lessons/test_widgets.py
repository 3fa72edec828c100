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
    assert hasattr(shown[1], "savefig")  # then the default figure, as a normal output
    assert plt.get_fignums() == []  # closed, so the inline backend does not draw it twice
    view.controls["x"].value = 2.0
    assert len(shown) == 2 and len(updated) == 1 and calls[-1] == (2.0, "m", 1.0)


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
