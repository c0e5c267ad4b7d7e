"""Nested state as a JSON tree plus flat tensors in one safetensors file: the trainer's serialisation, never pickle.

Design note. What the trainer keeps on disk besides weights is nested Python state: an encoded sample (dataclasses
of tensors), an optimizer's state dict (dicts keyed by integers, lists, numbers, tensors), an LR scheduler's, the
random states (tuples of ints, byte tensors), and DeepSpeed's optimizer shard (the same plus a few of its own
objects: a loss scaler, an enum, a dataclass). `flatten` turns such a value into a JSON tree whose leaves are
numbers, strings and None, with each tensor replaced by its path; the tensors go into a safetensors file and the
tree into that file's header metadata. Reading back runs no code from the file: safetensors holds only tensors, the
tree is JSON, and the only classes it can name are those the caller allows (`classes`), rebuilt from their fields
(a dataclass through its constructor, an enum from its value, any other allowed object by setting its attributes,
as pickle does, but for these classes only). Anything a tree may not hold is refused when it is written, with the
path of the field that holds it, so a bad value stops the save that meets it rather than the resume that needs it.

Tree nodes: {"tensor": path}, {"value": JSON scalar}, {"float": "nan" | "inf" | "-inf"}, {"list": [...]},
{"tuple": [...]}, {"dict": {str: node}} (string keys), {"items": [[key node, node], ...]} (other keys),
{"dataclass": "module:qualname", "fields": {...}}, {"enum": "module:qualname", "value": node},
{"object": "module:qualname", "state": {...}}.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..lora.files import write_safetensors

TREE_KEY = "qistudio_tree"
SCALARS = (bool, int, str, type(None))


class TreeError(ValueError):
    """A stored tree is malformed or names something it may not (a class not allowed, a missing tensor)."""


def class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def flatten(value, tensors: dict[str, torch.Tensor], classes: Callable[[str], bool], path: str = "state") -> dict:
    """The JSON tree of `value`; its tensors go into `tensors` under their path. `classes(name)` says which
    dataclasses, enums and other objects (by "module:qualname") may be stored; others are refused with the path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach()  # write_safetensors gives each its own contiguous host copy
        return {"tensor": path}
    if isinstance(value, float):  # before enum and int: a float is never rebuilt as anything else
        return {"value": value} if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, enum.Enum):
        return {"enum": _allowed(type(value), classes, path), "value": flatten(value.value, tensors, classes, path)}
    if isinstance(value, SCALARS):
        return {"value": value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: flatten(getattr(value, f.name), tensors, classes, f"{path}.{f.name}")
                  for f in dataclasses.fields(value)}
        return {"dataclass": _allowed(type(value), classes, path), "fields": fields}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [flatten(v, tensors, classes, f"{path}[{k}]") for k, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            return {"dict": {k: flatten(v, tensors, classes, f"{path}[{k!r}]") for k, v in value.items()}}
        return {"items": [[flatten(k, tensors, classes, f"{path} key {k!r}"),
                           flatten(v, tensors, classes, f"{path}[{k!r}]")] for k, v in value.items()]}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        name = _allowed(type(value), classes, path)
        return {"object": name, "state": {k: flatten(v, tensors, classes, f"{path}.{k}")
                                          for k, v in vars(value).items()}}
    raise TypeError(f"{path} is a {type(value).__name__}, which cannot be stored without pickle (tensors, numbers, "
                    "strings, None, lists, tuples, dicts and the allowed classes can)")


def _allowed(cls: type, classes: Callable[[str], bool], path: str) -> str:
    name = class_name(cls)
    if not classes(name):
        raise TypeError(f"{path} is a {cls.__name__} ({name}), which is not among the classes this file may hold")
    return name


def unflatten(node, tensors: dict[str, torch.Tensor], classes: Callable[[str], bool]):
    """The value a tree describes; TreeError for anything malformed or not allowed."""
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise TreeError(f"not a tree node: {str(node)[:80]}")
    if "tensor" in node:
        if not isinstance(node["tensor"], str) or node["tensor"] not in tensors:
            raise TreeError(f"the tree names a tensor {str(node['tensor'])[:80]!r} the file does not hold")
        return tensors[node["tensor"]]
    if "value" in node and len(node) == 1:
        if not isinstance(node["value"], (*SCALARS, float)):
            raise TreeError(f"not a scalar: {str(node['value'])[:80]}")
        return node["value"]
    if "float" in node:
        if node["float"] not in ("nan", "inf", "-inf"):
            raise TreeError(f"not a float: {str(node['float'])[:80]}")
        return float(node["float"])
    if "list" in node or "tuple" in node:
        items = [unflatten(v, tensors, classes) for v in _list(node.get("list", node.get("tuple")))]
        return items if "list" in node else tuple(items)
    if "dict" in node:
        if not isinstance(node["dict"], dict):
            raise TreeError("a dict node holds no mapping")
        return {k: unflatten(v, tensors, classes) for k, v in node["dict"].items()}
    if "items" in node:
        pairs = [_list(pair) for pair in _list(node["items"])]
        if any(len(pair) != 2 for pair in pairs):
            raise TreeError("an items node holds something other than [key, value] pairs")
        return {_key(unflatten(k, tensors, classes)): unflatten(v, tensors, classes) for k, v in pairs}
    if "enum" in node:
        return _class(node["enum"], classes, enum.Enum)(unflatten(node.get("value"), tensors, classes))
    if "dataclass" in node:
        cls = _class(node["dataclass"], classes, None)
        if not dataclasses.is_dataclass(cls):
            raise TreeError(f"{node['dataclass']} is not a dataclass")
        return _rebuild(cls, _fields(node.get("fields"), tensors, classes))
    if "object" in node:
        instance = object.__new__(_class(node["object"], classes, None))
        instance.__dict__.update(_fields(node.get("state"), tensors, classes))
        return instance
    raise TreeError(f"unknown tree node {sorted(node)}")


def _list(value) -> list:
    if not isinstance(value, list):
        raise TreeError(f"expected a list in the tree, got {type(value).__name__}")
    return value


def _key(value):
    if not isinstance(value, (*SCALARS, float, tuple)):
        raise TreeError(f"a dict key must be a scalar, got {type(value).__name__}")
    return value


def _fields(value, tensors, classes) -> dict:
    if not isinstance(value, dict):
        raise TreeError("an object node holds no field mapping")
    return {str(k): unflatten(v, tensors, classes) for k, v in value.items()}


def _class(name, classes: Callable[[str], bool], base: type | None) -> type:
    """The class a tree names, imported only once the caller allowed that exact name."""
    if not isinstance(name, str) or not classes(name):
        raise TreeError(f"the file names the class {str(name)[:80]}, which it may not hold")
    module_name, _, qualname = name.partition(":")
    try:
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as e:
        raise TreeError(f"the file names the class {name}, which cannot be imported here ({e})") from None
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        raise TreeError(f"the file names {name}, which is not a {'class' if base is None else base.__name__}")
    return cls


def _rebuild(cls: type, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise TreeError(f"{class_name(cls)} has no fields {sorted(unknown)}")
    instance = cls(**{k: v for k, v in values.items() if fields[k].init})
    for name, value in values.items():
        if not fields[name].init:
            object.__setattr__(instance, name, value)  # works for frozen dataclasses too
    return instance


def map_tensors(value, function: Callable[[torch.Tensor], torch.Tensor]):
    """`value` rebuilt with `function` applied to each of its tensors (e.g. moved to a device)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _rebuild(type(value), {f.name: map_tensors(getattr(value, f.name), function)
                                      for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, function) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, function) for k, v in value.items()}
    return value


def write_tree(path: Path, value, classes: Callable[[str], bool], metadata: dict | None = None,
               save: Callable | None = None) -> Path:
    """`value` into a safetensors file at `path` (written atomically): tensors plus the tree in the header.
    `save(tensors, path, metadata)` writes the file (default: qistudio's atomic writer)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(value, tensors, classes)
    header = {**(metadata or {}), TREE_KEY: json.dumps(tree)}
    (save or write_safetensors)(tensors, path, header)
    return Path(path)


def read_tree(path: Path, classes: Callable[[str], bool]):
    """The value `write_tree` stored at `path`. Errors (an unreadable file, a malformed or disallowed tree) are one
    ValueError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(TREE_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if raw is None:
            raise TreeError(f"no {TREE_KEY} entry in its header")
        return unflatten(json.loads(raw), tensors, classes)
    except (SafetensorError, TreeError, ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable qistudio state file ({type(e).__name__}: {e})") from None
