"""Errors that tell the user what went wrong and what to do about it.

Every check in sara-edu raises one of these instead of letting a shape or
dtype error surface from deep inside torch.
"""


class SaraEduError(ValueError):
    """Base class: bad input that the user can fix."""


class PromptError(SaraEduError):
    """A prompt uses a word outside the tiny text encoder's vocabulary."""


class DataError(SaraEduError):
    """A data folder is missing, empty or malformed."""


class CheckpointError(SaraEduError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class ConfigError(SaraEduError):
    """An impossible hyperparameter (negative learning rate, zero steps, ...)."""
