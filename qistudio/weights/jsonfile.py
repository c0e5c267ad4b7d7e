"""Strict JSON reading for the files a model folder holds: one error naming the file and the place, never a traceback.

Python's json module accepts `NaN`, `Infinity` and numbers such as `1e999` (which become infinity); no config,
index or header we read has a use for them, and a NaN that slips into a VAE's latent statistics or a LoRA's
alpha turns every image black without a word. So they are refused here, where the file is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import CheckpointError

_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"{text} is beyond the range of a float")
    return value


def describe_type(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(text: str | bytes, where: str, error: type[Exception] = CheckpointError, expect: type | None = dict,
               object_pairs_hook=None, encoding: str = "utf-8-sig"):
    """`text` parsed as strict JSON; any failure raises `error` naming `where` (a file) and the position."""
    try:
        # JSON files are UTF-8 (a byte-order mark from a Windows editor is tolerated where `encoding` says so);
        # json.loads would guess UTF-16 or UTF-32 from the first bytes.
        text = text.decode(encoding) if isinstance(text, bytes) else text
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=object_pairs_hook)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})") from None
    except _NonFinite as e:
        raise error(f"{where}: {e}") from None
    except RecursionError:
        raise error(f"{where}: the JSON is nested too deeply to be a config") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{where}: expected {_TYPE_NAMES.get(expect, expect.__name__)}, found {describe_type(value)}")
    return value


def read_json(path: str | Path, error: type[Exception] = CheckpointError, expect: type | None = dict):
    """The JSON file at `path` (an object unless `expect` says otherwise), with `error` for any read or format fault."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, str(path), error, expect)
