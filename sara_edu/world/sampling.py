"""The argument checks every sampler shares (``generate``, ``generate_sd``, the metrics, the lessons).

Sampling arguments come from learners typing in notebooks and from sliders, so
each is checked up front and a wrong one names itself, its value and what to
pass instead, rather than failing deep inside torch or diffusers (or, for a
non-finite guidance scale, returning NaN images).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

from ..errors import ConfigError, PromptError

# Seeds go to torch.Generator.manual_seed, which takes unsigned 64-bit values;
# image i uses seed + i, so keep seeds below 2**63 and there is room for any batch.
MAX_SEED = 2**63 - 1


def check_prompts(prompts, name: str = "prompts") -> list[str]:
    """``prompts`` as a non-empty list of strings (one string is one prompt).

    A list, a tuple or an iterator (e.g. a generator expression) of strings is
    accepted; anything else raises :class:`PromptError` naming the problem.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple, Iterator)):
        prompts = list(prompts)
    else:
        raise PromptError(f"{name} must be a string or a list of strings, got {type(prompts).__name__} "
                          f"{_short(prompts)}. Example: {name}=['a digit 3', 'a digit 7, cyberpunk style']")
    if not prompts:
        raise PromptError(f"{name} is empty: give at least one prompt, e.g. {name}=['a digit 3']")
    bad = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        i, p = bad[0]
        raise PromptError(f"{name}[{i}] is {type(p).__name__} {_short(p)}, not a string ({len(bad)} of "
                          f"{len(prompts)} prompts are not strings); write each prompt as text, e.g. 'a digit 3'")
    return prompts


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (bools and floats such as 25.0 are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {_short(value)}"
                          + (f" (write {name}={int(value)})" if _is_whole_number(value) else "") + _tail(hint))
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        span = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name} must be {span}, got {value}" + _tail(hint))
    return value


def check_seed(seed, name: str = "seed", hint: str = "image i starts from the noise of seed + i") -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in ``[0, 2**63 - 1]``."""
    return check_int(seed, name, 0, MAX_SEED, hint)


def check_guidance_scale(guidance_scale, name: str = "guidance_scale") -> float:
    """A finite, non-negative classifier-free guidance scale (NaN or inf would give NaN images)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {type(guidance_scale).__name__} {_short(guidance_scale)}")
    value = float(guidance_scale)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0 (1 = no guidance, 3-8 is usual), got {value}")
    return value


def check_steps(steps, max_steps: int, name: str = "steps") -> int:
    """Sampling steps: an integer from 1 to the schedule's ``max_steps`` training timesteps."""
    return check_int(steps, name, 1, max_steps,
                     f"a DDIM sampler takes at most one step per training timestep ({max_steps}); 25 is usual")


def check_sampling_args(prompts, steps, seed, guidance_scale, batch_size, max_steps: int) -> tuple:
    """All of a sampler's arguments at once: ``(prompts, steps, seed, guidance_scale, batch_size)``."""
    prompts = check_prompts(prompts)
    return (prompts, check_steps(steps, max_steps), check_seed(seed), check_guidance_scale(guidance_scale),
            check_int(batch_size, "batch_size", 1, hint="how many images run through the model at once"))


def _is_whole_number(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""
