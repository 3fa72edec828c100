"""The study: does the paper's comparison hold on the course model?

:mod:`.config` (what runs, the CSV schema), :mod:`.run` (run or resume it),
:mod:`.report` (tables and figures for ``reports/study.md``); ``python -m
sara_edu.study run|report`` (:mod:`.__main__`).
"""
