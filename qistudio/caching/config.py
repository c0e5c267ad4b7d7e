"""The step-cache settings a user writes (`pipe(..., cache=...)`, `--cache`): one frozen dataclass per method, the
presets, and the text form. No torch here: the command line parses `--cache` before anything heavy loads.

Each method is its authors' definition, with their defaults, so a setting moved from diffusers or cache-dit
computes and skips the same steps (tests/test_step_cache_parity.py):
- FirstBlockCache: diffusers' `FirstBlockCacheConfig(threshold)` (ParaAttention's First-Block Cache).
- DBCache: cache-dit's `DBCacheConfig` (Fn_compute_blocks -> front_blocks, Bn_compute_blocks -> back_blocks,
  max_warmup_steps -> warmup_steps, the rest by the same names), with its TaylorSeer calibrator
  (`TaylorSeerCalibratorConfig(taylorseer_order)`) when taylorseer_order > 0.
- TaylorSeer: diffusers' `TaylorSeerCacheConfig(use_lite_mode=True, ...)`: the DiT's output extrapolated
  (max_order -> order, disable_cache_before_step -> warmup_steps, disable_cache_after_step ->
  full_compute_from_step, taylor_factors_dtype -> factors_dtype).
- FixedSchedule: cache-dit's DBCache with `steps_computation_mask` (1 on every `every`-th step) and
  `steps_computation_policy="static"`: a schedule known in advance, for reproducible speed figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FACTOR_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class FirstBlockCache:
    """Run block 0; when its residual (output - input) changed by at most `threshold` (mean |r - r_prev| /
    mean |r_prev|, against the last step that ran every block), reuse the rest's residual instead of running it."""

    threshold: float = 0.05


@dataclass(frozen=True)
class DBCache:
    """Dual Block Cache: always run the first `front_blocks` and the last `back_blocks`; the middle is skipped (its
    residual reused, or extrapolated with TaylorSeer of `taylorseer_order`) when the front blocks' residual changed
    by less than `residual_diff_threshold` (relative mean absolute difference, as FirstBlockCache).

    No step is skipped in the warm-up (steps 0, warmup_interval, ... below warmup_steps), past `max_cached_steps`
    skipped steps in total, or after `max_continuous_cached_steps` skipped in a row (negative: no limit)."""

    front_blocks: int = 8
    back_blocks: int = 0
    residual_diff_threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int = 0


@dataclass(frozen=True)
class TaylorSeer:
    """Run the DiT on steps 0 .. warmup_steps-1, then on every `cache_interval`-th step (warmup_steps + 1,
    warmup_steps + 1 + cache_interval, ...: diffusers' rule), and on every step from `full_compute_from_step`;
    on the others predict its output with an order-`order` Taylor expansion from the steps that ran (divided
    differences of the outputs, kept in `factors_dtype`)."""

    order: int = 1
    cache_interval: int = 5
    warmup_steps: int = 3
    full_compute_from_step: int | None = None
    factors_dtype: str = "bfloat16"


@dataclass(frozen=True)
class FixedSchedule:
    """Run every block on steps 0, every, 2 every, ...; on the others run only the first `front_blocks` and the
    last `back_blocks` and reuse the middle's residual from the last full step. front_blocks=0 skips the whole
    stack (cache-dit has no such setting: it always runs one block)."""

    every: int = 2
    front_blocks: int = 1
    back_blocks: int = 0


StepCacheSetting = FirstBlockCache | DBCache | TaylorSeer | FixedSchedule
METHODS = {"first-block": FirstBlockCache, "dbcache": DBCache, "taylorseer": TaylorSeer, "fixed": FixedSchedule}

# Presets by what they do. Each is data: the exact settings are listed by `qistudio generate --help` and stored
# in full in a PNG's parameters, so an image keeps its settings if a preset changes.
PRESETS: dict[str, StepCacheSetting] = {
    # Every 2nd / 3rd step skips all but block 0: a fixed 2x / 3x fewer full steps, reproducible speed figures.
    "compute-every-2": FixedSchedule(every=2),
    "compute-every-3": FixedSchedule(every=3),
    # cache-dit's defaults (F8B0, threshold 0.08, 8 warm-up steps): skips only where the front blocks barely move.
    "skip-similar-mild": DBCache(),
    # One front block, threshold 0.12, at most 3 skipped in a row, the skipped residual extrapolated (TaylorSeer
    # order 1): more steps skipped, further from the uncached image.
    "skip-similar-strong": DBCache(front_blocks=1, residual_diff_threshold=0.12, max_continuous_cached_steps=3,
                                   taylorseer_order=1),
    # diffusers' TaylorSeer defaults: full steps 0, 1, 2, 4, 9, 14, ..., the others extrapolated.
    "extrapolate-4-of-5": TaylorSeer(),
}


def _check_int(name: str, value, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_setting(setting: StepCacheSetting) -> StepCacheSetting:
    """Raise ValueError naming the first bad field; return the setting."""
    kind = type(setting).__name__
    if isinstance(setting, FirstBlockCache):
        _check_number(f"{kind}.threshold", setting.threshold)
    elif isinstance(setting, DBCache):
        _check_int(f"{kind}.front_blocks", setting.front_blocks, 1)  # the decision reads the front blocks' residual
        _check_int(f"{kind}.back_blocks", setting.back_blocks, 0)
        _check_number(f"{kind}.residual_diff_threshold", setting.residual_diff_threshold)
        _check_int(f"{kind}.warmup_steps", setting.warmup_steps, 0)
        _check_int(f"{kind}.warmup_interval", setting.warmup_interval, 1)
        _check_int(f"{kind}.max_cached_steps", setting.max_cached_steps, None)
        _check_int(f"{kind}.max_continuous_cached_steps", setting.max_continuous_cached_steps, None)
        _check_int(f"{kind}.taylorseer_order", setting.taylorseer_order, 0)
    elif isinstance(setting, TaylorSeer):
        _check_int(f"{kind}.order", setting.order, 0)
        _check_int(f"{kind}.cache_interval", setting.cache_interval, 1)
        _check_int(f"{kind}.warmup_steps", setting.warmup_steps, 1)  # a prediction needs one computed step
        if setting.full_compute_from_step is not None:
            _check_int(f"{kind}.full_compute_from_step", setting.full_compute_from_step, 0)
        if setting.factors_dtype not in FACTOR_DTYPES:
            raise ValueError(f"{kind}.factors_dtype must be one of {', '.join(FACTOR_DTYPES)}, "
                             f"got {setting.factors_dtype!r}")
    elif isinstance(setting, FixedSchedule):
        _check_int(f"{kind}.every", setting.every, 1)
        _check_int(f"{kind}.front_blocks", setting.front_blocks, 0)
        _check_int(f"{kind}.back_blocks", setting.back_blocks, 0)
    else:
        raise ValueError(f"expected a preset name ({', '.join(PRESETS)}), a 'method:field=value,...' text or one of "
                         f"FirstBlockCache, DBCache, TaylorSeer, FixedSchedule; got {setting!r}")
    return setting


def _value(text: str):
    """A field's value from text: None, an int, a float, or the text itself (a dtype name)."""
    if text in ("None", "none"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> StepCacheSetting:
    """A preset name, or 'METHOD:FIELD=VALUE,...' (METHOD one of first-block, dbcache, taylorseer, fixed; fields
    not given keep their defaults), e.g. 'dbcache:front_blocks=1,residual_diff_threshold=0.12'."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    method, _, fields = text.partition(":")
    if method not in METHODS:
        raise ValueError(f"unknown step cache {text!r}: give a preset ({', '.join(PRESETS)}) or "
                         f"METHOD:FIELD=VALUE,... with METHOD one of {', '.join(METHODS)}")
    cls = METHODS[method]
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for item in filter(None, (part.strip() for part in fields.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"{method}: expected FIELD=VALUE with FIELD one of {', '.join(names)}, got {item!r}")
        values[name.strip()] = _value(value.strip())
    return check_setting(cls(**values))


def setting_text(setting: StepCacheSetting) -> str:
    """The full text form of a setting (every field), which parse_setting reads back to an equal setting."""
    method = next(name for name, cls in METHODS.items() if isinstance(setting, cls))
    fields = ",".join(f"{f.name}={getattr(setting, f.name)}" for f in dataclasses.fields(setting))
    return f"{method}:{fields}"


def resolve_setting(value) -> StepCacheSetting | None:
    """None, a preset name, a setting text or a setting object -> a checked setting (or None); ValueError else."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_setting(value)
    return check_setting(value)
