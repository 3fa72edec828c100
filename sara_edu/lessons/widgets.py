"""Sliders that also work where nobody can move them.

A course notebook is read in three ways: live in Jupyter (sliders move, the
figure redraws), executed headless by CI (no front end at all), and as a static
page (GitHub, nbviewer, an exported HTML) where only saved outputs show. So
:func:`interactive_or_static` always calls the update function once with the
default values and shows its result as an ordinary output: the figure, as a
PNG image, is in the static page (and in a notebook saved from Jupyter and
reopened without a kernel, where the controls themselves cannot be drawn). When a Jupyter front end can exist it also shows the controls and,
when one moves, redraws *that same output in place* (a display id update), so
the page never fills up with stale figures.

A display id update reaches only the page that received the display: after a
page reload (kernel still running) the outputs come from the saved file, which
keeps no display ids, so the update would be dropped and the figure would never
change again. A slider move therefore also draws the result into an ``Output``
widget in the control box, which the reloaded page restores from the kernel like
the sliders; a CSS rule sent with it hides the cell's (now stale) static outputs
below the box, so one figure shows, in the same place.

The logic behind a widget is a plain function ``fn(**values)`` that returns what
to show (a matplotlib Figure, a DataFrame, a string for Markdown, or a tuple of
these): it can be unit-tested without any widget.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable

from ..errors import ConfigError

STATIC_TEXT = "(interactive controls: open this notebook in Jupyter to move them; the output below uses the defaults)"

#: Width of every slider's track (the part right of its label), so sliders line up whatever their labels.
TRACK_WIDTH = "330px"
#: Longest drop-down label shown in full; longer ones lose their shared beginning (the tail tells them apart).
MAX_LABEL_CHARS = 72
#: Height of the status line under the controls: reserved even when empty, so "updating…" never moves the figure.
STATUS_HEIGHT = "1.7em"


class StaticControl:
    """Stand-in for a slider where ipywidgets is not installed: it only holds a value."""

    def __init__(self, value, description: str = ""):
        self.value = value
        self.description = description

    def __repr__(self):
        return f"StaticControl({self.description or 'value'}={self.value!r})"


def _ipywidgets():
    try:
        import ipywidgets

        return ipywidgets
    except ImportError:
        return None


def _ipython_shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def front_end_possible() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (a front end may be attached).

    A headless nbclient run is also a kernel: the controls are then created and
    shown as a static text line, which is harmless.
    """
    shell = _ipython_shell()
    return _ipywidgets() is not None and shell is not None and getattr(shell, "kernel", None) is not None


def slider(default, min, max, step=None, *, log: bool = False, description: str | None = None,
           readout_format: str | None = None):
    """A slider for :func:`interactive_or_static` (int, float, or log-scale float).

    Integers give an ``IntSlider``; ``log=True`` gives a ``FloatLogSlider`` from
    ``min`` to ``max`` (both > 0, ``step`` in decades). Sliders update on release
    (``continuous_update=False``) because each redraw may generate images.
    """
    if not min <= default <= max:
        raise ConfigError(f"slider default {default} is outside [{min}, {max}]")
    if log and min <= 0:
        raise ConfigError(f"a log-scale slider needs min > 0, got {min}")
    w = _ipywidgets()
    if w is None:
        return StaticControl(default, description or "")
    common = dict(description=description or "", continuous_update=False, style={"description_width": "initial"},
                  layout=w.Layout(width=f"calc({len(description or '') + 1}ch + {TRACK_WIDTH} + 9ch)"))
    if log:
        return w.FloatLogSlider(value=default, base=10, min=math.log10(min), max=math.log10(max),
                                step=step or 0.05, readout_format=readout_format or ".2e", **common)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (default, min, max)) and (step is None or isinstance(step, int)):
        return w.IntSlider(value=default, min=min, max=max, step=step or 1, **common)
    return w.FloatSlider(value=float(default), min=float(min), max=float(max), step=step or (max - min) / 100,
                         readout_format=readout_format or ".3g", **common)


def option_labels(options, max_chars: int = MAX_LABEL_CHARS) -> list[str]:
    """What a drop-down shows for each option: the option itself, or for long strings the part that differs.

    Long tensor names share their beginning (``up_blocks.1.attentions.0.transformer_blocks.0.ff...``)
    and differ near the end, so a too-narrow menu cuts exactly the part that tells them apart. When
    the longest option has more than ``max_chars`` characters, the dotted components every option
    starts with become "…", and what is still too long keeps its last ``max_chars`` characters
    (unless two options would then look the same).
    """
    labels = [str(o) for o in options]
    if max(map(len, labels)) <= max_chars:
        return labels
    parts = [label.split(".") for label in labels]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    if shared and len(labels) > 1:
        labels = ["…" + ".".join(p[shared:]) for p in parts]
    tails = [label if len(label) <= max_chars else "…" + label[-(max_chars - 1):] for label in labels]
    return tails if len(set(tails)) == len(set(labels)) else labels  # never two options with one label


def dropdown(options, default=None, *, description: str | None = None):
    """A drop-down menu for :func:`interactive_or_static`; ``default`` is the first option if not given.

    The menu is as wide as its longest label (see :func:`option_labels` for very long ones),
    so long names are shown whole; the value passed on is always the option itself.
    """
    options = list(options)
    if not options:
        raise ConfigError("dropdown needs at least one option")
    default = options[0] if default is None else default
    if default not in options:
        raise ConfigError(f"dropdown default {default!r} is not one of the options {options}")
    w = _ipywidgets()
    if w is None:
        return StaticControl(default, description or "")
    labels = option_labels(options)
    return w.Dropdown(options=list(zip(labels, options)), value=default, description=description or "",
                      style={"description_width": "initial"},
                      layout=w.Layout(width=f"calc({len(description or '') + 1}ch + {max(map(len, labels)) + 2}ch + 24px)",
                                      max_width="100%"))


def _is_control(obj) -> bool:
    if isinstance(obj, StaticControl):
        return True
    w = _ipywidgets()
    return w is not None and isinstance(obj, w.ValueWidget)


def _as_items(result, new_figures) -> list:
    """Normalise what ``fn`` returned into the list of things to show."""
    if result is None:
        return list(new_figures)
    return list(result) if isinstance(result, (tuple, list)) else [result]


def figure_png(fig) -> bytes:
    """The figure as PNG bytes, cropped like Jupyter's inline backend crops it (``bbox_inches="tight"``)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _displayable(item):
    """What to hand to ``display``: Markdown for a str, a PNG image for a figure, else the item itself.

    A figure becomes a plain ``image/png`` output whatever matplotlib backend the kernel
    uses: an interactive backend (``%matplotlib widget``) would show it as a widget, which
    a notebook saved and reopened without its kernel cannot draw.
    """
    from IPython.display import Image, Markdown

    if isinstance(item, str):
        return Markdown(item)
    if hasattr(item, "savefig") and hasattr(item, "canvas"):
        return Image(data=figure_png(item), format="png")
    return item


class InteractiveView:
    """The live (or static) view built by :func:`interactive_or_static`.

    ``controls``: name -> widget; ``values``: the current values; ``result``: what
    the last call of ``fn`` returned; ``calls``: how many times ``fn`` ran;
    ``error``: the last error raised while redrawing after a slider moved.
    """

    def __init__(self, fn: Callable, controls: dict, fixed: dict):
        self.fn = fn
        self.controls = controls
        self.fixed = fixed
        self.result = None
        self.items: list = []
        self.calls = 0
        self.error: BaseException | None = None
        self._handles: list = []
        self._holding = False
        self._status = None
        self._live = None  # an ipywidgets.Output in the box: what a slider move draws (see the module doc)
        self.box = None
        self.mark = f"sara-view-{id(self):x}"  # a CSS class on the box, so its own cell's static outputs can hide

    @property
    def values(self) -> dict:
        return {**self.fixed, **{name: c.value for name, c in self.controls.items()}}

    def _call(self):
        """Run ``fn`` with the current values; collect what it shows without double-displaying."""
        import matplotlib.pyplot as plt

        before = set(plt.get_fignums())
        self.result = self.fn(**self.values)
        self.calls += 1
        new = [plt.figure(n) for n in plt.get_fignums() if n not in before]
        self.items = _as_items(self.result, new)
        return new

    def _show_first(self, display_outputs: bool):
        import matplotlib.pyplot as plt

        new = self._call()
        if display_outputs:
            from IPython.display import display

            self._handles = [display(_displayable(item), display_id=True) for item in self.items]
            # shown already: close so the inline backend does not draw them a second time
            for fig in new:
                plt.close(fig)

    def refresh(self, *_, live: bool = False):
        """Recompute with the current control values and update the shown outputs in place.

        ``live``: a control moved in a front end (the observer passes it): also draw into the box's ``Output``
        widget, which survives a page reload where the display id update does not.
        """
        if self._holding:
            return
        import matplotlib.pyplot as plt

        self._set_status("<span style='color:#666'>updating…</span>")
        before = set(plt.get_fignums())
        try:
            new = self._call()
        except Exception as e:  # a slider callback has nowhere to raise to: say it in the UI
            self.error = e
            for n in set(plt.get_fignums()) - before:  # half-drawn figures must not surface in a later cell
                plt.close(n)
            message = html.escape(f"{type(e).__name__}: {e}", quote=True)
            # one line (the full message on hover and in view.error), so the layout stays still
            self._set_status(f"<span style='color:#b00; white-space:nowrap' title=\"{message}\">error: {message}</span>")
            return
        self.error = None
        shown = [_displayable(item) for item in self.items]
        if self._handles:  # the static outputs: what a save keeps (unless the page was reloaded meanwhile)
            from IPython.display import Markdown

            for i, handle in enumerate(self._handles):
                handle.update(shown[i] if i < len(shown) else Markdown(""))
        if live and self._live is not None:
            self._draw_live(shown)
        for fig in new:
            plt.close(fig)
        self._set_status("")

    def _draw_live(self, shown) -> None:
        """Show ``shown`` in the box's Output widget and hide the static outputs below the box (same cell)."""
        from IPython.display import HTML, clear_output, display

        hide = (f"<style>.jp-OutputArea-child:has(.{self.mark}) ~ .jp-OutputArea-child {{display: none}}"
                f" .{self.mark} .jp-OutputArea-child {{padding: 0}}</style>")
        with self._live:
            clear_output(wait=True)  # the old figure stays until the new one arrives: no flicker, no jump
            for item in shown:
                display(item)
            display(HTML(hide))  # after the figure: it hides the static copy only once the live one is there

    def _on_change(self, change) -> None:
        self.refresh(live=True)

    def update(self, **values):
        """Set several controls (or fixed values) at once and redraw once; returns ``result``."""
        unknown = set(values) - set(self.controls) - set(self.fixed)
        if unknown:
            raise ConfigError(f"unknown control(s) {sorted(unknown)}; known: {sorted(self.values)}")
        self._holding = True
        try:
            for name, value in values.items():
                if name in self.controls:
                    self.controls[name].value = value
                else:
                    self.fixed[name] = value
        finally:
            self._holding = False
        self.refresh()
        if self.error is not None:
            raise self.error
        return self.result

    def _set_status(self, html: str):
        if self._status is not None:
            self._status.value = html

    def _build_box(self, title: str | None):
        w = _ipywidgets()
        live = [c for c in self.controls.values() if not isinstance(c, StaticControl)]
        if w is None or not live:
            return None
        _line_up(live)
        for c in live:
            c.observe(self._on_change, names="value")
        # a reserved line: showing "updating…" must not push the figure down and back up on every redraw
        self._status = w.HTML("", layout=w.Layout(height=STATUS_HEIGHT, overflow="hidden"))
        self._live = w.Output()
        header = [w.HTML(f"<b>{title}</b>")] if title else []
        self.box = w.VBox([*header, *live, self._status, self._live])
        self.box.add_class(self.mark)
        return self.box

    def _ipython_display_(self):
        """Echoing the view (last line of a cell) shows nothing new: it is on screen already."""
        return None


def _line_up(controls) -> None:
    """Give every control the same label width, so the slider tracks start and end at the same place.

    Each control alone would size its label to its text ("seed" vs "guidance scale") and the
    tracks would start at different places. Widths are in ``ch`` (the width of a digit in
    the widget font), which follows the font the browser actually uses.
    """
    described = [c for c in controls if getattr(c, "description", "")]
    if not described:
        return
    w = _ipywidgets()
    label = f"{max(len(c.description) for c in described) + 1}ch"
    for c in controls:
        c.style.description_width = label
        if isinstance(c, w.Dropdown):  # room for its longest label and the arrow
            chars = max(len(o[0] if isinstance(o, tuple) else str(o)) for o in c.options)
            c.layout.width = f"calc({label} + {chars + 2}ch + 24px)"
        elif hasattr(c, "readout"):  # a slider: label + the same track length for all + readout
            c.layout.width = f"calc({label} + {TRACK_WIDTH} + 9ch)"


class _Controls:
    """The control box, shown live in Jupyter and as a one-line note in static output."""

    def __init__(self, box):
        self.box = box

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.box._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = STATIC_TEXT
        return bundle


def interactive_or_static(fn: Callable, *, title: str | None = None, **sliders) -> InteractiveView:
    """Show ``fn``'s output for the default values, with live controls where Jupyter can show them.

    ``sliders``: keyword -> control (from :func:`slider`, :func:`dropdown`, or any
    ipywidgets value widget; its current value is the default) or a plain value,
    passed to ``fn`` unchanged. ``fn(**values)`` returns what to show: a Figure,
    a DataFrame, a str (shown as Markdown), a tuple of these, or None to show the
    figures it created. It should return the same number of items every time.

    Always calls ``fn`` once right away, so the result is in the notebook's static
    output; never raises for lack of a front end. Errors in that first call do
    propagate (CI must see them); errors after a slider moves are shown under the
    controls and kept in ``view.error``.
    """
    controls = {k: v for k, v in sliders.items() if _is_control(v)}
    fixed = {k: v for k, v in sliders.items() if not _is_control(v)}
    view = InteractiveView(fn, controls, fixed)
    view._build_box(title)
    shell = _ipython_shell()
    in_ipython = shell is not None
    if front_end_possible() and view.box is not None:
        from IPython.display import display

        display(_Controls(view.box))  # controls first, then the output they drive
    view._show_first(display_outputs=in_ipython)
    return view
