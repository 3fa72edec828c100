"""Notebook 03's graded exercises: the solved pieces pass, the blanks say 'not written yet', and each usual
mistake is named; the learner's notebook is the solved one with its solution blocks stripped."""
import json

import pytest
import torch

from sara_edu.lessons import exercises
from sara_edu.world.paths import REPO_ROOT

SOLVED = REPO_ROOT / "notebooks" / "solutions" / "03_sara_step_by_step.ipynb"
LEARNER = REPO_ROOT / "notebooks" / "03_sara_step_by_step.ipynb"


def _pieces(path, strip=False) -> dict:
    """The five exercise functions as the notebook at ``path`` defines them (its solution blocks stripped or not)."""
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"torch": torch}
    for source in cells:
        if "# BEGIN SOLUTION" in source or "raise NotImplementedError" in source:
            body = source[source.index("def "):source.index("\nexercises.check_")]  # the definition alone
            exec(exercises.strip_solutions(body) if strip else body, namespace)
    return {name: namespace[name] for name in exercises.CHECKS}


def test_the_solved_pieces_pass_every_check():
    pieces = _pieces(SOLVED)
    verdicts = {name: exercises.CHECKS[name](fn) for name, fn in pieces.items()}
    assert all(verdicts.values()), [str(v) for v in verdicts.values()]
    assert exercises.ready(**pieces)


def test_blank_pieces_say_not_written_yet_and_the_library_check_waits(capsys):
    pieces = _pieces(SOLVED, strip=True)
    for name, fn in pieces.items():
        verdict = exercises.CHECKS[name](fn)
        assert not verdict and "not written yet" in str(verdict), (name, str(verdict))
    assert not exercises.ready(**pieces)
    out = capsys.readouterr().out
    assert sum(line.startswith("✗") for line in out.splitlines()) == 5 and "equality check runs once" in out
    with pytest.raises(TypeError, match="missing"):
        exercises.ready(select_mask=pieces["select_mask"])


@pytest.mark.parametrize("piece, wrong, says", [
    ("select_mask", lambda w, t: (w.abs() <= t).flatten().nonzero().squeeze(1), "exactly θ"),
    ("select_mask", lambda w, t: (w < t).flatten().nonzero().squeeze(1), "magnitude |w|"),
    ("select_mask", lambda w, t: None, "returned None"),
    ("select_mask", lambda w, t: (w.abs() < t).flatten(), "positions (integers)"),
    ("select_mask", lambda w, t: (w.abs() < t).nonzero(), "1-D"),
    ("keep_selected", lambda g, i: g * 0 + g, "dense gradient"),
    ("keep_selected", lambda g, i: g.flatten()[: len(i)], "first entries"),
    ("nuclear_subgradient", lambda d, lam: (lambda u, s, vh: u @ vh)(*torch.linalg.svd(d, full_matrices=False)),
     "factor λ"),
    ("nuclear_subgradient", lambda d, lam: (lambda u, s, vh: lam * u @ vh)(*torch.linalg.svd(d, full_matrices=False)),
     "σ = 0"),
    ("progressive_keep", lambda v, t: v.abs() >= t, "inverted"),
    ("progressive_keep", lambda v, t: v < t, "|v| with θ"),
    ("progressive_keep", lambda v, t: v.abs() <= t, "exactly at θ"),
])
def test_each_usual_mistake_is_named(piece, wrong, says):
    verdict = exercises.CHECKS[piece](wrong)
    assert not verdict and says in verdict.message, str(verdict)


def _adamw(decay_first=True, correct=True, decay=True, in_place=True):
    def update(value, grad, m, v, step, lr, wd=1e-2, b1=0.9, b2=0.999, eps=1e-8):
        if not in_place:
            value = value * 1  # a new tensor: the caller's value never changes
        if decay and decay_first:
            value.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mh, vh = (m / (1 - b1 ** step), v / (1 - b2 ** step)) if correct else (m, v)
        value.addcdiv_(mh, vh.sqrt() + eps, value=-lr)
        if decay and not decay_first:
            value.sub_(lr * wd * value)
    return update


@pytest.mark.parametrize("kw, says", [({"correct": False}, "bias correction"), ({"decay": False}, "no weight decay"),
                                      ({"decay_first": False}, "after the Adam step"),
                                      ({"in_place": False}, "in place")])
def test_adamw_slips_are_named(kw, says):
    assert exercises.check_adamw_update(_adamw())  # the right one passes
    verdict = exercises.check_adamw_update(_adamw(**kw))
    assert not verdict and says in verdict.message, str(verdict)


def test_a_piece_that_crashes_is_reported_not_raised():
    verdict = exercises.check_mask(lambda w, t: w.nonexistent)
    assert not verdict and "raised AttributeError" in verdict.message


@pytest.mark.parametrize("name, pieces", [("03_sara_step_by_step.ipynb", 5), ("04_sara_vs_lora.ipynb", 3)])
def test_the_learners_notebook_is_the_solved_one_stripped(name, pieces):
    solved, learner = REPO_ROOT / "notebooks" / "solutions" / name, REPO_ROOT / "notebooks" / name
    assert json.loads(learner.read_text()) == exercises.learner_notebook(solved), (
        f"notebooks/{name} drifted from its solved version: edit notebooks/solutions/{name}, then "
        f"python -m sara_edu.lessons.exercises notebooks/solutions/{name} notebooks/{name}")
    text = learner.read_text()
    assert "# BEGIN SOLUTION" not in text and text.count(exercises.TODO.replace('"', '\\"')) == pieces


def test_handouts_refuse_what_is_not_a_notebook_and_use_the_solved_version(tmp_path):
    from sara_edu.errors import ConfigError
    from sara_edu.lessons.handouts import render, solved_version

    with pytest.raises(ConfigError, match="notebook file"):
        render(tmp_path / "missing.ipynb", tmp_path)
    assert solved_version(LEARNER) == SOLVED
    other = REPO_ROOT / "notebooks" / "00_welcome.ipynb"
    assert solved_version(other) == other
