"""Checks of single values a caller passes: each returns the value normalised or raises one InputError naming it.

Design note. The rules are the strict ones a diffusers-style user expects: bool is not a number (True is not a
height of 1), numpy scalars are (np.int64 from a sweep, np.float32 from an array), a float is not an integer
(1024.0 for a height is refused rather than silently truncated), and a number must be finite: NaN or infinity
in guidance, a shift or noise would otherwise run the whole generation and return a black image. Checked values
come back as plain Python ints and floats, so they print, compare and serialise (PNG metadata) like any other.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import torch


class InputError(ValueError):
    """A value a caller passed has the wrong type or is out of range; the message names the argument."""


def shown(value) -> str:
    """A short one-line description of a bad value: its repr (cut at 60 characters) and, where unclear, its type."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0:
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = " ".join(repr(value).split())
    if len(text) > 60:
        text = text[:57] + "..."
    plain = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return text if plain or value is None else f"{text} ({type(value).__name__})"


def _bounds(minimum, maximum, above) -> str:
    low = f"({above}" if above is not None else f"[{minimum}" if minimum is not None else None
    if low is not None and maximum is not None:
        return f" in {low}, {maximum}]"
    if low is not None:
        return f" > {above}" if above is not None else f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None,
            bounds: str | None = None) -> int:
    """An int (numpy integers too; not bool, not float) within [minimum, maximum] (`bounds`: how to say so)."""
    bounds = _bounds(minimum, maximum, None) if bounds is None else bounds
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer{bounds}, got {shown(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be an integer{bounds}, got {value}")
    return value


def number(name: str, value, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> float:
    """A finite real number (int, float, numpy scalar; not bool, not str) within the bounds; `above` is exclusive."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number{_bounds(minimum, maximum, above)}, got {shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (above is not None and value <= above)):
        raise InputError(f"{name} must be{_bounds(minimum, maximum, above)}, got {value}")
    return value


def flag(name: str, value) -> bool:
    """True or False (numpy bools too); 0, 1 and strings are refused, since "False" is truthy."""
    if not _is_bool(value):
        raise InputError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {shown(value)}")
    return value


def function(name: str, value) -> Callable:
    if not callable(value):
        raise InputError(f"{name} must be callable, got {shown(value)}")
    return value


def optional(check: Callable, **bounds) -> Callable:
    """`check` that lets None through (an unset optional argument)."""
    return lambda name, value: None if value is None else check(name, value, **bounds)


def with_bounds(check: Callable, **bounds) -> Callable:
    return lambda name, value: check(name, value, **bounds)


def int_or_pair(name: str, value, minimum: int = 1) -> int | tuple[int, int]:
    """An int, or a (height, width) pair of ints, each >= minimum."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InputError(f"{name} must be an integer or a (height, width) pair, got {shown(value)}")
        return tuple(integer(f"{name}[{k}]", v, minimum) for k, v in enumerate(value))
    return integer(name, value, minimum)


def number_list(name: str, values) -> list[float]:
    """A non-empty list (or tuple, or 1-D tensor/array) of finite numbers."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise InputError(f"{name} must be a 1-D list of numbers, got shape {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not values:
        raise InputError(f"{name} must be a non-empty list of numbers, got {shown(values)}")
    return [number(f"{name}[{k}]", v) for k, v in enumerate(values)]


def finite_tensor(name: str, value) -> torch.Tensor:
    """A floating-point torch tensor with no NaN or infinity anywhere (checked in one pass, no copy)."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {shown(value)}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise InputError(f"{name} has {bad} non-finite value(s) (NaN or infinity) of {value.numel()}")
    return value


def device(name: str, value) -> str:
    """A device random numbers can be drawn on here ('cpu', 'cuda', 'cuda:1', ...)."""
    if not isinstance(value, (str, torch.device)):
        raise InputError(f"{name} must be a device name such as 'cpu' or 'cuda', got {shown(value)}")
    try:
        torch.Generator(value)
    except Exception as e:  # torch raises RuntimeError, AcceleratorError, ... by backend
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{name}={str(value)!r} cannot draw random numbers here: {first_line}") from None
    return str(value)
