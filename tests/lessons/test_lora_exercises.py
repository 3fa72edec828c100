"""Notebook 04's LoRA-from-scratch exercises: the solved pieces equal PEFT, the blanks say 'not written yet', and
each usual mistake (no scale, α without /r, swapped factors, a changed W, ...) is named."""
import json
import math

import pytest
import torch
from torch import nn

from sara_edu.lessons import exercises, lora_exercises
from sara_edu.world.paths import REPO_ROOT

SOLVED = REPO_ROOT / "notebooks" / "solutions" / "04_sara_vs_lora.ipynb"


def _pieces(strip=False) -> dict:
    """The three functions as the solved notebook 04 defines them (its solution blocks stripped or not)."""
    namespace = {"torch": torch, "math": math}
    for cell in json.loads(SOLVED.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and "# BEGIN SOLUTION" in source:
            body = source[source.index("def "):source.index("\nlora_exercises.check_")]
            exec(exercises.strip_solutions(body) if strip else body, namespace)
    return {name: namespace[name] for name in lora_exercises.CHECKS}


def test_the_solved_pieces_pass_and_equal_peft_on_the_course_unet(tiny_pipe):
    pieces = _pieces()
    assert lora_exercises.ready(**pieces)
    table = lora_exercises.on_course_unet(tiny_pipe.unet, **pieces, rank=2)
    assert table.loc["all", "forward vs PEFT"].max() < 1e-12 and table.loc["all", "merge vs PEFT"].max() < 1e-12
    weights = sum(m.weight.numel() for n, m in tiny_pipe.unet.named_modules()
                  if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    assert int(table.loc["all", "weights"].iloc[0]) == weights


def test_on_the_course_unet_a_wrong_merge_shows_as_a_difference(tiny_pipe):
    pieces = _pieces()
    pieces["lora_merge"] = lambda w, A, B, alpha: w + B @ A  # forgets α / r
    table = lora_exercises.on_course_unet(tiny_pipe.unet, **pieces, rank=2, alpha=4.0)
    assert table.loc["all", "merge vs PEFT"].max() > 1e-6


def test_blank_pieces_say_not_written_yet_and_the_unet_check_waits(capsys):
    pieces = _pieces(strip=True)
    for name, fn in pieces.items():
        verdict = lora_exercises.CHECKS[name](fn)
        assert not verdict and "not written yet" in str(verdict), (name, str(verdict))
    assert not lora_exercises.ready(**pieces)
    out = capsys.readouterr().out
    assert sum(line.startswith("✗") for line in out.splitlines()) == 3 and "runs once all three" in out
    with pytest.raises(TypeError, match="missing"):
        lora_exercises.ready(lora_factors=pieces["lora_factors"])


def _zeros(shape):
    return torch.zeros(*shape, dtype=torch.float64)


@pytest.mark.parametrize("factors, says", [
    (lambda w, r, g: (_zeros((w.shape[0], r)), _zeros((r, w.shape[1]))), "swapped"),
    (lambda w, r, g: (_zeros((r, w.shape[1])), torch.randn(w.shape[0], r, generator=g, dtype=w.dtype)),
     "PEFT draws A at random"),
    (lambda w, r, g: (_zeros((r, w.shape[1])), _zeros((w.shape[0], r))), "nothing ever trains"),
    (lambda w, r, g: (torch.rand(r, w.shape[1], generator=g, dtype=w.dtype) * 0.1,
                      torch.rand(w.shape[0], r, generator=g, dtype=w.dtype)), "start B at zero"),
    (lambda w, r, g: (torch.rand(r, w.shape[1], generator=g, dtype=w.dtype) * 3, _zeros((w.shape[0], r))),
     "too large"),
    (lambda w, r, g: (torch.rand(r, w.shape[1], dtype=w.dtype) * 0.1, _zeros((w.shape[0], r))), "generator="),
    (lambda w, r, g: (torch.rand(r, w.shape[1], generator=g) * 0.1, torch.zeros(w.shape[0], r)), "dtype"),
])
def test_each_wrong_start_is_named(factors, says):
    verdict = lora_exercises.check_factors(factors)
    assert not verdict and says in verdict.message, str(verdict)


@pytest.mark.parametrize("forward, says", [
    (lambda x, w, b, A, B, a: x @ w.T + b + (x @ A.T) @ B.T, "no scale"),
    (lambda x, w, b, A, B, a: x @ w.T + b + a * (x @ A.T) @ B.T, "divide it by the rank"),
    (lambda x, w, b, A, B, a: x @ w.T + b + (A.shape[0] / a) * (x @ A.T) @ B.T, "r / α"),
    (lambda x, w, b, A, B, a: x @ w.T + (a / A.shape[0]) * (x @ A.T) @ B.T, "bias is missing"),
    (lambda x, w, b, A, B, a: (a / A.shape[0]) * (x @ A.T) @ B.T, "frozen layer's output"),
    (lambda x, w, b, A, B, a: (x @ w.T + b).T, "shape"),
    (lambda x, w, b, A, B, a: x @ w.T + b - (a / A.shape[0]) * (x @ A.T) @ B.T, "differs from PEFT"),
])
def test_each_wrong_forward_is_named(forward, says):
    verdict = lora_exercises.check_forward(forward)
    assert not verdict and says in verdict.message, str(verdict)


@pytest.mark.parametrize("merge, says", [
    (lambda w, A, B, a: w + B @ A, "no scale"),
    (lambda w, A, B, a: B @ A * a / A.shape[0], "ΔW alone"),
    (lambda w, A, B, a: w.add_(B @ A * a / A.shape[0]), "changed the weight"),
    (lambda w, A, B, a: A.T @ B.T, "shape"),
    (lambda w, A, B, a: w - B @ A * a / A.shape[0], "differs from PEFT"),
])
def test_each_wrong_merge_is_named(merge, says):
    verdict = lora_exercises.check_merge(merge)
    assert not verdict and says in verdict.message, str(verdict)


def test_the_start_the_notebook_describes_is_peft_s():
    """The notebook says PEFT starts B at zero and draws A uniform in ±1/√in: a fresh PEFT layer does."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.layer = nn.Linear(300, 40)
    layer = inject_adapter_in_model(LoraConfig(r=8, target_modules=["layer"]), holder).layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert B.abs().max() == 0 and 0 < A.abs().max() <= 1 / math.sqrt(300)
    assert A.abs().max() > 0.9 / math.sqrt(300)  # the bound is the distribution's, not a loose one
