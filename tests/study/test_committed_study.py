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
    from sara_edu.study.report import LEARNED_AGREEMENT, learned_styles

    learned = learned_styles(results[results.study == FULL.name])
    assert set(learned) == set(FULL.styles)
    assert LEARNED_AGREEMENT == 0.8  # the bar
    assert min(learned.values()) >= LEARNED_AGREEMENT, learned
