"""Step caching: skip the DiT work that changes least between denoising steps (First-Block Cache, DBCache,
TaylorSeer, a fixed schedule). The settings (config.py) import no torch; the caches themselves load on first use.
"""

from __future__ import annotations

from .config import (PRESETS, DBCache, FirstBlockCache, FixedSchedule, StepCacheSetting, TaylorSeer, parse_setting,
                     resolve_setting, setting_text)

__all__ = ["PRESETS", "cache_argument", "DBCache", "FirstBlockCache", "FixedSchedule", "StepCacheSetting", "TaylorSeer", "parse_setting",
           "resolve_setting", "setting_text", "start_cache"]


def cache_argument(name: str, value) -> StepCacheSetting | None:
    """The request's check of `cache`: None or a checked setting; an InputError naming `name` otherwise."""
    try:
        return resolve_setting(value)
    except (ValueError, TypeError) as e:
        from ..validation import InputError

        raise InputError(f"{name}: {e}") from None


def start_cache(setting: StepCacheSetting | None, num_layers: int):
    """The step cache of one pipeline call over a DiT of `num_layers` blocks (None without a setting). A setting
    that does not fit the DiT is an InputError naming it."""
    if setting is None:
        return None
    from ..validation import InputError

    front, back = (setting.front_blocks, setting.back_blocks) if isinstance(setting, (DBCache, FixedSchedule)) else (0, 0)
    if front + back > num_layers:
        raise InputError(f"cache={setting_text(setting)}: front_blocks + back_blocks = {front + back} exceeds the "
                         f"DiT's {num_layers} blocks")
    if isinstance(setting, FirstBlockCache):
        from .first_block import FirstBlockStepCache

        return FirstBlockStepCache(setting, num_layers)
    if isinstance(setting, DBCache):
        from .dual_block import DBStepCache

        return DBStepCache(setting, num_layers)
    if isinstance(setting, FixedSchedule):
        from .dual_block import FixedStepCache

        return FixedStepCache(setting, num_layers)
    from .taylorseer import TaylorSeerStepCache

    return TaylorSeerStepCache(setting)
