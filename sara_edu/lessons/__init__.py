"""The code behind each notebook, one module per notebook, named after it.

======================================  ==========================================
notebook                                module
======================================  ==========================================
``00_welcome.ipynb``                    :mod:`.welcome`
``01_weight_distributions.ipynb``       :mod:`.weight_distributions`
``02_pruning_thresholds.ipynb``         :mod:`.pruning_thresholds`
``03_sara_step_by_step.ipynb``          :mod:`.sara_step_by_step`
``04_sara_vs_lora.ipynb``               :mod:`.sara_vs_lora`
``05_stable_diffusion_gpu.ipynb``       :mod:`.stable_diffusion_gpu`
======================================  ==========================================

Shared by all: :mod:`.notebook` (QUICK vs full, set-up, timing), :mod:`.display`
(image grids) and :mod:`.widgets` (sliders that degrade to static figures). The graded
exercises have their own checkers: :mod:`.exercises` (SaRA, notebook 03) and :mod:`.lora_exercises` (LoRA,
notebook 04).
"""
