"""The committed study (reports/study_results.csv) and what the course takes from it."""
import pytest

from sara_edu.study.config import CHOSEN_LRS, FULL, NOTEBOOK_METHODS, read_results
from sara_edu.study.run import choose_lrs, lr_candidates
from sara_edu.world.paths import REPO_ROOT

CSV = REPO_ROOT / "reports" / "study_results.csv"


@pytest.fixture(scope="module")
def results():
    if not CSV.exists():
        pytest.skip("no committed study in this checkout (an installed wheel has no reports/)")
    return read_results(CSV)


def test_chosen_rates_are_the_committed_searchs_choice(results):
    chosen = choose_lrs(FULL, results)
    assert {m: chosen[m] for m in FULL.methods} == CHOSEN_LRS
    assert set(NOTEBOOK_METHODS.values()) <= set(CHOSEN_LRS)


def test_no_chosen_rate_sits_on_the_edge_of_what_was_tried(results):
    candidates = lr_candidates(FULL, results)
    for m, lr in CHOSEN_LRS.items():
        assert min(candidates[m]) < lr < max(candidates[m]), (m, lr, candidates[m])


def test_full_fine_tuning_learns_every_style_in_the_budget(results):
    from sara_edu.study.select import LEARNED_AGREEMENT, learned_styles

    learned = learned_styles(results[results.study == FULL.name])
    assert set(learned) == set(FULL.styles)
    assert LEARNED_AGREEMENT == 0.8  # the bar
    assert min(learned.values()) >= LEARNED_AGREEMENT, learned


def test_the_committed_report_is_what_the_committed_code_makes_of_the_committed_csv(results, tmp_path):
    """reports/study.md regenerated now equals the committed one: its verdicts follow the current rules."""
    from sara_edu.study.report import write_report

    committed = (REPO_ROOT / "reports" / "study.md").read_text()
    out = write_report(CSV, tmp_path / "reports" / "study.md", study=FULL.name, root=REPO_ROOT)
    fresh = out.read_text().replace(f"`{CSV}`", "`reports/study_results.csv`")
    assert fresh.splitlines() == committed.splitlines()


def _pairs(text: str) -> list[tuple[str, str]]:
    """Every 'mean ± spread' in ``text``, as written (unicode minus made ASCII)."""
    import re

    return re.findall(r"([+-]?\d[\d,]*\.?\d*(?:e-?\d+)?) ± (\d[\d,]*\.?\d*(?:e-?\d+)?)", text.replace("−", "-"))


def _matches(shown: tuple[str, str], full: tuple[str, str]) -> bool:
    """``shown`` is ``full`` rounded to the digits ``shown`` writes."""
    def decimals(s):
        return len(s.split(".")[1]) if "." in s else 0

    return all(round(float(f.replace(",", "")), decimals(s)) == float(s.replace(",", ""))
               for s, f in zip(shown, full))


def test_the_readmes_study_numbers_are_the_reports(results):
    """Every 'x ± y' the README quotes from the study is a pair of reports/study.md, rounded."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("From `reports/study.md`"):readme.index("The claims table in `reports/study.md`")]
    quoted = _pairs(section)
    assert len(quoted) >= 10, quoted
    report = _pairs((REPO_ROOT / "reports" / "study.md").read_text())
    if (REPO_ROOT / "reports" / "controls.md").exists():  # the where-vs-how paragraph quotes the controls report
        report += _pairs((REPO_ROOT / "reports" / "controls.md").read_text())
    missing = [q for q in quoted if not any(_matches(q, r) for r in report)]
    assert not missing, f"README quotes {missing}, which reports/study.md and controls.md do not have (regenerate, then update)"


CONTROLS_CSV = REPO_ROOT / "reports" / "controls_results.csv"


@pytest.mark.skipif(not CONTROLS_CSV.exists(), reason="no committed controls study in this checkout")
def test_the_controls_chosen_rates_are_its_searchs_choice_and_the_report_is_current(tmp_path):
    from sara_edu.study.config import CONTROLS_CHOSEN_LRS, CONTROLS_STUDY, FULL
    from sara_edu.study.report import write_report

    results = read_results(CONTROLS_CSV)
    chosen, candidates = choose_lrs(CONTROLS_STUDY, results), lr_candidates(CONTROLS_STUDY, results)
    assert {m: chosen[m] for m in CONTROLS_CHOSEN_LRS} == CONTROLS_CHOSEN_LRS
    for m in CONTROLS_STUDY.methods:
        assert min(candidates[m]) < chosen[m] < max(candidates[m]), (m, chosen[m], candidates[m])
    assert all(chosen[m] == CHOSEN_LRS[m] for m in FULL.methods)  # FULL's runs, reused: the same choice
    committed = (REPO_ROOT / "reports" / "controls.md").read_text()
    out = write_report(CONTROLS_CSV, tmp_path / "reports" / "controls.md", study=CONTROLS_STUDY.name, root=REPO_ROOT)
    fresh = out.read_text().replace(f"`{CONTROLS_CSV}`", "`reports/controls_results.csv`")
    assert fresh.splitlines() == committed.splitlines()
