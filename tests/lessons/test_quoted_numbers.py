"""The checker of quoted numbers: a QUICK sentence's numbers must be in the run's outputs or its code."""
from sara_edu.lessons import quoted_numbers as Q

OUTPUT = "update vs first (%)  0.112  1.819\nagreement 0.857 0.929\nrank_90 41.25 48.75"


def test_numbers_a_quick_sentence_quotes_are_found_in_the_run_rounded_as_written():
    md = ("The QUICK setting's 5 steps show smaller differences (0.1% and 1.8%).\n\n"
          "In QUICK the classifier agrees on 86-93% of the samples; `rank_90` is about 41 instead of 49.")
    assert Q.unsupported(md, [OUTPUT, "STEPS = choose(quick=5, full=50)"]) == []


def test_a_number_the_run_did_not_print_is_reported_with_its_sentence():
    md = "In the QUICK setting the gate passes 14% of the samples and the FID analogue is 285.1."
    missing = Q.unsupported(md, [OUTPUT])
    assert [q.text for q in missing] == ["14%", "285.1"] and "gate passes" in missing[0].sentence
    assert [q.text for q in Q.unsupported(md, [OUTPUT, "gate 0.14 fid 285.139"])] == []
    # rounded as written: the run's 0.112 supports "0.1%" and "0.11%", not "0.12%"
    assert [q.text for q in Q.unsupported("QUICK: 0.11% and 0.12%.", [OUTPUT])] == ["0.12%"]


def test_parts_about_another_source_are_not_checked_against_the_quick_run():
    md = ("Each matrix has rank 64; in the QUICK setting `rank_90` is about 41 instead of 49 (the full setting's "
          "run: 37 instead of 48), and `benchmarks/nuclear_lambda.py` measured 37.5. The full setting measured "
          "0.180 s (QUICK: 9.99×).")
    assert [q.text for q in Q.unsupported(md, [OUTPUT])] == ["9.99×"]


def test_running_times_code_formulas_and_sentences_without_quick_are_left_alone():
    md = ("*Running time:* QUICK setting about 1 min (57 s).\n\n"
          "The QUICK setting calls `notebook.choose(quick=10, full=25)` with $\\lambda = 5e-4$.\n\n"
          "The full setting measured 77.2 MB.")
    assert Q.unsupported(md, [""]) == []


def test_a_round_whole_number_is_as_precise_as_its_last_non_zero_digit():
    md = "In QUICK the FID analogue rises to about 200 at 20%, 1,500 at 40% and 4,500 at 50%."
    assert Q.unsupported(md, ["fid 197.9 1494 4508", "fractions 20 40 50"]) == []
    assert [q.text for q in Q.unsupported(md, ["fid 260 1494 4508", "20 40 50"])] == ["200"]
