"""Reading a model's ``config.json`` so that a bad value names its file and key.

diffusers and transformers build a model straight from the values of a
``config.json``. A malformed value (a string where a number belongs, a zero
group count) otherwise fails deep in their ``__init__`` with an unrelated
message (``ZeroDivisionError: integer modulo by zero``), or builds a wrong model
that fails later. :func:`check_config` checks each value against the type the
class declares for it, then builds the model once on PyTorch's ``meta`` device
(no memory, milliseconds even for Stable Diffusion) and, if that fails, finds
the key whose removal changes the failure, so the error names it.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path

import torch

from ..errors import CheckpointError


def read_config(path, what: str = "config") -> dict:
    """The JSON object in ``path``, or a :class:`CheckpointError` saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}); restore it or re-create it") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not a valid JSON file (line {e.lineno}, column {e.colno}: {e.msg}); "
                              "restore it or re-create it") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of settings, got {type(config).__name__}")
    return config


def check_config(config: dict, cls, source, build=None, allow_unknown: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the key of ``config`` that cannot build ``cls``.

    ``build(settings)`` builds the model (default ``cls(**settings)``);
    ``build=False`` skips the trial build. Keys starting with ``_`` are
    bookkeeping (``_class_name``) and ignored. ``allow_unknown=False`` refuses
    keys ``cls`` does not take (diffusers itself ignores them with a warning).
    """
    params = _parameters(cls)
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = [k for k in settings if params is not None and k not in params]
    if unknown and not allow_unknown:
        raise CheckpointError(f"{source}: key {unknown[0]!r} is not a setting of {cls.__name__} "
                              f"({len(unknown)} unknown keys). Remove it, or re-create the file with save_pretrained.")
    settings = {k: v for k, v in settings.items() if k not in unknown}
    for key, value in settings.items():
        problem = _type_problem(key, value, params[key]) if params else None
        if problem:
            raise CheckpointError(f"{source}: {key}={value!r} is not valid for {cls.__name__}: {problem}. "
                                  "Fix that value, or re-create the file.")
    if build is False:
        return
    build = build or (lambda s: cls(**s))
    error = _build_error(build, settings)
    if error is None:
        return
    # The key whose default makes the build work is the one to fix (a key whose removal merely changes
    # the error is not: dropping down_block_types changes every error).
    culprit = next((k for k in settings
                    if _build_error(build, {j: v for j, v in settings.items() if j != k}) is None), None)
    if culprit is None:  # else the key holding a word the error quotes ("NoSuchBlock2D does not exist")
        culprit = next((k for k, v in settings.items()
                        if any(isinstance(w, str) and len(w) > 2 and w in error
                               for w in (v if isinstance(v, (list, tuple)) else [v]))), None)
    where = f"{culprit}={settings[culprit]!r}" if culprit else "its values (no single key is to blame)"
    raise CheckpointError(f"{source}: {where} cannot build {cls.__name__} ({error}). Fix that value, or "
                          "re-create the file.")


def _build_error(build, settings) -> str | None:
    try:
        with torch.device("meta"):
            build(dict(settings))
    except Exception as e:  # noqa: BLE001 - any failure of a third-party __init__ means "these settings do not work"
        return f"{type(e).__name__}: {e}"
    return None


def _parameters(cls) -> dict | None:
    """``{name: (annotation or None, default)}`` of ``cls.__init__``; None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolved forward references: fall back to the defaults' types
        hints = {}
    return {n: (hints.get(n), p.default) for n, p in sig.parameters.items() if n != "self"}


def _type_problem(key: str, value, spec) -> str | None:
    annotation, default = spec
    if annotation is None:
        if default is inspect.Parameter.empty or default is None:
            return None
        annotation = type(default)
        if annotation in (list, tuple):
            return None if isinstance(value, (list, tuple)) else f"expected a list like {default!r}"
    ok = _matches(value, annotation)
    if ok is False:
        return f"expected {_describe(annotation)}, got {type(value).__name__}"
    ints = [value] if _matches(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if ints and all(_matches(v, int) for v in ints) and min(ints) < 0 and not key.endswith("_id"):
        return "sizes and counts cannot be negative"
    return None


def _matches(value, annotation) -> bool | None:
    """Does a JSON ``value`` fit ``annotation``? None when the annotation is beyond this check."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _matches_any(value, typing.get_args(annotation))
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if not args:
            return True
        results = [_matches_any(v, args) for v in value]
        return False if False in results else (None if None in results else True)
    return None


def _matches_any(value, annotations) -> bool | None:
    results = [_matches(value, a) for a in annotations]
    return True if True in results else (None if None in results else False)


def _describe(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
