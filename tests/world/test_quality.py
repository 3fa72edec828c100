"""The quality gate: calibrated on half of the real held-out images, checked on the other half and on
images a person would reject."""
import pytest
import torch

from sara_edu.errors import PromptError
from sara_edu.world.metrics import evaluate
from sara_edu.world.quality import corruptions, gate_report, heldout_halves, load_gate, sharpness
from sara_edu.world.styles import LOOKS


@pytest.fixture(scope="module")
def report():
    return gate_report()


def test_real_images_pass_and_corrupted_ones_do_not_on_every_look(report):
    real = report[report.set == "real (validation half)"].set_index("look").pass_rate
    assert set(real.index) == set(LOOKS)
    assert (real >= 0.95).all(), real  # images the gate never saw in calibration
    for bad in ("noise", "pixel-shuffled", "blurred"):
        rates = report[report.set == bad].set_index("look").pass_rate
        assert (rates <= 0.05).all(), (bad, rates)


def test_each_check_catches_what_it_is_for():
    gate = load_gate()
    real = heldout_halves("cyberpunk")[1]
    bad = corruptions(real)
    low, high = gate.sharpness_band["cyberpunk"]
    assert (sharpness(bad["blurred"]) < low).float().mean() > 0.9  # blur removes edges
    assert (sharpness(bad["noise"]) > high).all()  # noise is all edges
    assert (sharpness(bad["pixel-shuffled"]) > high).float().mean() > 0.9


def test_the_gate_judges_each_image_by_its_own_look_and_names_bad_looks():
    gate = load_gate()
    plain, cyber = heldout_halves("plain")[1][:20], heldout_halves("cyberpunk")[1][:20]
    both = torch.cat([plain, cyber])
    per_image = gate.passes(both, ["plain"] * 20 + ["cyberpunk"] * 20)
    assert per_image.float().mean() > 0.8
    assert torch.equal(per_image[:20], gate.passes(plain, None))  # None means plain
    with pytest.raises(PromptError, match="unknown look"):
        gate.passes(plain, "sepia")
    with pytest.raises(PromptError, match="one per image"):
        gate.passes(plain, ["plain"] * 3)


def test_evaluate_counts_agreement_only_for_images_that_pass(tiny_pipe):
    scores = evaluate(tiny_pipe, style="cyberpunk", digits=[1, 2], n_per_digit=2, steps=2)
    assert 0 <= scores["gated_agreement"] <= min(scores["agreement"], scores["gate_pass"])
