"""sara-edu: learn and use SaRA (progressive sparse low-rank adaptation) next to LoRA.

Importing the package is cheap: submodules (and torch/diffusers behind them)
load on first use, e.g. ``sara_edu.load_pretrained`` or ``from sara_edu.sara import SaRAAdamW``.

The folders are the architecture: ``sara/`` the method, ``training/`` the baselines and the
one loop, ``world/`` the course's tiny world, ``sd/`` Stable Diffusion, ``measure/`` memory and
time, ``lessons/`` the code behind each notebook, ``study/`` the comparison behind the report.
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> submodule that defines it; resolved lazily by __getattr__
_EXPORTS = {
    # the method (sara_edu.sara: torch + safetensors only)
    "SaRAAdamW": "sara", "save_sparse": "sara", "load_sparse": "sara", "select_parameters": "sara",
    "nuclear_norm_penalty": "sara", "detach": "sara", "merge": "sara",
    # the baselines and the one loop
    "train": "training", "pick_device": "training", "TrainingMethod": "training", "FullFineTuning": "training",
    "SaRA": "training", "LoRA": "training", "SelectiveFineTuning": "training",
    "lora_rank_matching": "training.lora", "save_lora": "training.lora", "load_lora": "training.lora",
    "merge_lora": "training.lora",
    # the course's tiny world
    "load_pretrained": "world.model", "generate": "world.model", "TinyDiffusion": "world.model",
    "build_unet": "world.model", "save_pretrained": "world.model", "list_checkpoints": "world.model",
    "make_prompt": "world.text", "TinyTextEncoder": "world.text", "STYLES": "world.text",
    "StyleDataset": "world.data", "ImageFolderDataset": "world.data", "load_digits_images": "world.data",
    "load_classifier": "world.classifier", "fid_analogue": "world.metrics", "prompt_agreement": "world.metrics",
    "vlhi": "world.metrics", "vlhi_table": "world.metrics", "evaluate": "world.metrics",
    "per_digit_recognition": "world.metrics",
    # Stable Diffusion
    "load_stable_diffusion": "sd", "generate_sd": "sd", "tiny_sd_pipeline": "sd", "StableDiffusionAdapter": "sd",
    # measurement
    "MemoryTracker": "measure", "MemoryReport": "measure", "measure_step_time": "measure",
    # errors
    "SaraEduError": "errors", "CheckpointError": "errors", "DataError": "errors", "ConfigError": "errors",
    "PromptError": "errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sara_edu' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
