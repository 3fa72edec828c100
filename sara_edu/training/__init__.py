"""The baselines and the one loop: every method trains through :func:`train`.

:mod:`.loop` is the diffusers text-to-image loop, small; :mod:`.method` says what
a method is (and holds full fine-tuning); :mod:`.sara`, :mod:`.lora` (through
PEFT) and :mod:`.selective` (LT-SFT style, the same mask without SaRA's memory
trick) are the methods the course compares.
"""
from .loop import pick_device, train
from .lora import LoRA
from .method import FullFineTuning, TrainingMethod
from .sara import SaRA
from .selective import SelectiveFineTuning

__all__ = ["train", "pick_device", "TrainingMethod", "FullFineTuning", "SaRA", "LoRA", "SelectiveFineTuning"]
