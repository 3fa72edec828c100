"""The course's tiny world: everything that makes SaRA observable on a laptop CPU.

Digits rendered in five styles (:mod:`.data`, :mod:`.styles`), a tiny text
encoder (:mod:`.text`), a 1.7M-parameter diffusion model and its sampler
(:mod:`.model`), a reference classifier (:mod:`.classifier`) whose features give
the metrics (:mod:`.metrics`), where the shipped files live (:mod:`.paths`),
and the recipes that regenerate ``data/`` (:mod:`.recipes`).
"""
