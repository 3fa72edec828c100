"""One protocol: notebook 04 and the study train and score the same way, so their numbers agree.

Notebook 04's full setting is the study's run for (cyberpunk, seed 0) at each method's chosen rate: the
numbers its markdown quotes from that setting must lie within the study's seed spread for that style (padded
by the study's equivalence margin), or the two have drifted apart again.
"""
import json
import re

import pytest

from sara_edu.lessons import sara_vs_lora as lesson
from sara_edu.study.config import FULL, NOTEBOOK_METHODS, read_results
from sara_edu.study.stats import margin_for
from sara_edu.world.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "04_sara_vs_lora.ipynb"
CSV = REPO_ROOT / "reports" / "study_results.csv"


def _cells(kind):
    return ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == kind]


def full_setting_table() -> dict[str, dict[str, float]]:
    """Notebook 04's 'What we measured in the full setting' table: {method: {column: value}} (percent -> share)."""
    text = next(t for t in _cells("markdown") if "What we measured in the full setting" in t)
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        values = {}
        for h, c in zip(header[1:], cells[1:]):
            if c:
                values[h] = float(c.rstrip("%")) / 100 if c.endswith("%") else float(c)
        out[cells[0]] = values
    return out


def test_the_notebooks_full_setting_is_the_studys_protocol():
    p = lesson.study_protocol()
    assert (p.steps, p.batch_size, p.limit_per_digit, p.n_per_digit, p.sample_steps) == (
        FULL.steps, FULL.batch_size, FULL.limit_per_digit, FULL.eval_per_digit, FULL.eval_steps)
    code = "\n".join(_cells("code"))
    # the settings come from the protocol, and every training set is limited to its images per digit
    for needed in ("lesson.study_protocol()", "full=PROTOCOL.steps", "full=PROTOCOL.n_per_digit",
                   "full=PROTOCOL.sample_steps", "BATCH = PROTOCOL.batch_size"):
        assert needed in code, needed
    datasets = re.findall(r"StyleDataset\([^)]*\)|finetune_methods\([^)]*\)", code, re.S)
    assert datasets and all("IMAGES_PER_DIGIT" in d or "dataset=" in d for d in datasets), datasets
    notebook_03 = json.loads((REPO_ROOT / "notebooks" / "03_sara_step_by_step.ipynb").read_text())
    styled = re.findall(r"StyleDataset\([^)]*\)", "".join("".join(c["source"]) for c in notebook_03["cells"]))
    assert styled and all("limit_per_digit=IMAGES_PER_DIGIT" in d for d in styled), styled


@pytest.mark.skipif(not CSV.exists(), reason="no committed study in this checkout")
def test_notebook_04s_full_setting_numbers_are_the_studys_for_the_same_style_and_seed():
    results = read_results(CSV)
    rows = results[(results.study == FULL.name) & (results["style"] == "cyberpunk") & (results.prior == 0) &
                   results.phase.str.contains("main")]
    table = full_setting_table()
    assert set(NOTEBOOK_METHODS) <= set(table), table.keys()
    for name, key in NOTEBOOK_METHODS.items():
        runs = rows[rows.method == key]
        assert len(runs) >= 2, key
        for column, col in (("style agreement", "agreement"), ("style FID (digits 0-6)", "fid")):
            low, high = float(runs[col].min()), float(runs[col].max())
            pad = max(high - low, margin_for(col).of(float(runs[col].abs().mean())))
            shown = table[name][column]
            assert low - pad <= shown <= high + pad, (
                f"notebook 04 (full setting) shows {name} {column} = {shown}, the study's cyberpunk runs "
                f"{low:.3g}..{high:.3g}: rerun 04 in its full setting and update its table, or find the drift")
