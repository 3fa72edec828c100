"""sara-edu: learn and use SaRA (progressive sparse low-rank adaptation) next to LoRA.

Importing the package is cheap: submodules (and torch/diffusers behind them)
load on first use, e.g. ``sara_edu.load_pretrained`` or ``from sara_edu.sara import SaRA``.
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> submodule that defines it; resolved lazily by __getattr__
_EXPORTS = {
    "load_pretrained": "model", "generate": "model", "TinyDiffusion": "model", "build_unet": "model",
    "save_pretrained": "model", "list_checkpoints": "model",
    "make_prompt": "text", "TinyTextEncoder": "text", "STYLES": "text",
    "StyleDataset": "data", "ImageFolderDataset": "data", "load_digits_images": "data",
    "train": "train", "FullFineTuning": "train", "TrainingMethod": "train", "pick_device": "train",
    "load_stable_diffusion": "sd", "generate_sd": "sd", "tiny_sd_pipeline": "sd",
    "StableDiffusionAdapter": "sd",
    "show_images": "course", "environment_report": "course", "choose": "course", "QUICK": "course",
    "interactive_or_static": "widgets",
    "weight_stats": "weights", "kind_stats": "weights", "parameter_kind": "weights",
    "prune_below": "pruning", "pruned_copy": "pruning", "fraction_below": "pruning",
    "threshold_for_fraction": "pruning", "quality_vs_pruning": "pruning",
    "SaraEduError": "errors", "CheckpointError": "errors", "DataError": "errors",
    "ConfigError": "errors", "PromptError": "errors",
    "SaRA": "sara", "SaRAAdamW": "sara", "save_sparse": "sara", "load_sparse": "sara",
    "nuclear_norm_penalty": "sara",
    "SelectiveFineTuning": "selective", "select_parameters": "selection",
    "LoRA": "lora", "lora_rank_matching": "lora", "save_lora": "lora", "load_lora": "lora", "merge_lora": "lora",
    "MemoryTracker": "memory", "MemoryReport": "memory", "measure_step_time": "memory",
    "plot_memory_breakdown": "memory",
    "load_classifier": "classifier", "fid_analogue": "metrics", "prompt_agreement": "metrics",
    "vlhi": "metrics", "vlhi_table": "metrics", "evaluate": "metrics", "per_digit_recognition": "metrics",
    "finetune_methods": "compare", "side_by_side": "compare", "metric_table": "compare",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sara_edu' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
