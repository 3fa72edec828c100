"""Every lesson draws figures: a headless backend, no figure left open between tests, and every figure
a test leaves open must fit JupyterLab's notebook column (tight bounding box, as Jupyter crops it)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sara_edu.lessons.display import COLUMN_WIDTH_IN  # noqa: E402

SLACK_IN = 0.3  # tight cropping adds a margin of a few points around what is drawn


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    too_wide = []
    for number in plt.get_fignums():
        fig = plt.figure(number)
        width = fig.get_tightbbox(fig.canvas.get_renderer()).width  # inches, legends outside the axes included
        if width > COLUMN_WIDTH_IN + SLACK_IN:
            too_wide.append(f"'{fig.get_suptitle() or fig.axes[0].get_title() if fig.axes else number}': {width:.1f} in")
    plt.close("all")
    assert not too_wide, f"figures wider than the notebook column ({COLUMN_WIDTH_IN} in): {too_wide}"
