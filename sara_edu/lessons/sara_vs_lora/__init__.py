"""SaRA versus LoRA versus full fine-tuning, under the same budget: the logic of notebook 04.

The paper's comparison in miniature. Every method starts from its own copy of
the *same* pretrained model and trains on the *same* style data with the *same*
budget (optimizer steps, batch size, learning rate, seed, cosine schedule),
through the course's one training loop (:func:`sara_edu.training.train`). Only
*what* trains differs:

* **SaRA**: the smallest 10% of |w| (sparse, low-rank penalty, progressive);
* **LoRA**: a low-rank adapter whose rank is chosen so that it trains about as
  many numbers as SaRA (:func:`sara_edu.training.lora.lora_rank_matching`);
* **full fine-tuning**: every weight.

:func:`finetune_methods` trains them and measures, for each, what it costs:
peak memory with its breakdown (a :class:`~sara_edu.measure.memory.MemoryTracker`
watches the attach and the first ``tracked_steps`` steps, as in
``benchmarks/memory_time.py``), the median time of the untracked steps, the
number of trained values and the size of the file one would ship. Afterwards
every model is merged into a plain model, so all of them generate the same way.

:func:`metric_table` then asks the three questions of the paper: does the
model draw the new style (FID analogue, prompt agreement, VLHI), does it still
draw plain digits (the prior it keeps), and does the style carry over to digits
it never saw in the style (generalisation)? :func:`side_by_side` is the logic
behind the notebook's sample widget.
"""
from .figures import (
    memory_breakdown_frame,
    memory_with_the_model,
    plot_costs,
    plot_losses,
    side_by_side,
    side_by_side_view,
)
from .metrics import (
    METRIC_COLUMNS,
    gate_figure,
    gated_samples,
    metric_table,
    paper_claims,
    plot_metric_table,
    summary_table,
    where_how,
)
from .training import (
    COLOURS,
    CONTROL_METHODS,
    DEFAULT_METHODS,
    REFERENCE,
    Comparison,
    FineTuned,
    Protocol,
    canonical_method_name,
    fair_step_times,
    finetune_methods,
    finetune_one,
    make_method,
    study_controls_learning_rates,
    study_learning_rates,
    study_protocol,
)

__all__ = ["DEFAULT_METHODS", "REFERENCE", "FineTuned", "Comparison", "canonical_method_name", "make_method",
           "finetune_one", "finetune_methods", "memory_breakdown_frame", "plot_costs", "plot_losses",
           "side_by_side", "side_by_side_view", "metric_table", "plot_metric_table", "summary_table",
           "METRIC_COLUMNS", "COLOURS", "paper_claims", "study_learning_rates", "study_protocol", "Protocol", "fair_step_times", "gate_figure", "gated_samples", "where_how",
           "CONTROL_METHODS", "study_controls_learning_rates", "memory_with_the_model"]
