"""bitsandbytes checkpoints (NF4 / FP4 and LLM.int8, as diffusers and transformers save them): which weights they
keep quantised, with what, checked against each other before anything is read.

A 4-bit linear is saved as `P.weight` (uint8, two codes per byte over the flattened weight), `P.weight.absmax`
(float32 per block, or uint8 when the absmaxes are themselves quantised: `P.weight.nested_absmax` and
`P.weight.nested_quant_map` then decode them), `P.weight.quant_map` (the 16-value code book) and
`P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON object in a uint8 tensor with the weight's real
shape, its block size and the nested offset. An 8-bit linear is `P.weight` (int8, the real shape), `P.SCB`
(float32 per row) and `P.weight_format` (a format tag, nothing to load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import CheckpointError
from .jsonfile import parse_json

QUANT_STATE = ".quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass(frozen=True)
class BnbWeight:
    """One quantised weight: its type ("NF4", "FP4", "INT8"), real shape, and the checkpoint keys of its parts."""

    qtype: str
    shape: tuple[int, ...]
    parts: dict[str, str] = field(default_factory=dict)  # "weight", "absmax", "nested_absmax", ... -> key
    blocksize: int = 0
    offset: float = 0.0  # nested absmaxes: added after decoding

    @property
    def nested(self) -> bool:
        return "nested_absmax" in self.parts


def _quant_state(source, key: str) -> dict:
    raw = source.get(key)
    where = source.where(key)
    if raw.dtype.itemsize != 1 or raw.dim() != 1:
        raise CheckpointError(f"{where}: a bitsandbytes quant state is a 1-D byte tensor, not {list(raw.shape)} "
                              f"{raw.dtype}")
    return parse_json(bytes(raw.tolist()), where)


def _check_shape(where: str, state: dict) -> tuple[int, ...]:
    shape = state.get("shape")
    if not (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape)):
        raise CheckpointError(f"{where}: \"shape\" is {shape!r}; expected the weight's sizes, such as [3072, 3072]")
    return tuple(shape)


def _four_bit(source, weight_key: str, qtype: str) -> BnbWeight:
    state_key = weight_key + QUANT_STATE + qtype.lower()
    where = source.where(state_key)
    state = _quant_state(source, state_key)
    if str(state.get("quant_type", "")).upper() != qtype:
        raise CheckpointError(f"{where}: quant_type {state.get('quant_type')!r} in a {qtype.lower()} quant state")
    shape = _check_shape(where, state)
    blocksize = state.get("blocksize")
    if blocksize not in BLOCKSIZES:
        raise CheckpointError(f"{where}: blocksize {blocksize!r}; bitsandbytes uses one of {BLOCKSIZES}")
    parts = {"weight": weight_key, **{p: f"{weight_key}.{p}" for p in _4BIT_PARTS if f"{weight_key}.{p}" in source}}
    count = math.prod(shape)
    blocks = -(-count // blocksize)
    expected = {"weight": ((-(-count // 2), 1), ("U8",)), "quant_map": ((16,), ("F32",))}
    nested = "nested_absmax" in parts or "nested_quant_map" in parts
    if nested:
        offset = state.get("nested_offset")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise CheckpointError(f"{where}: a nested quant state needs a numeric \"nested_offset\", got {offset!r}")
        expected.update(absmax=((blocks,), ("U8",)), nested_quant_map=((256,), ("F32",)),
                        nested_absmax=((-(-blocks // NESTED_BLOCKSIZE),), ("F32",)))
    else:
        offset = 0.0
        expected["absmax"] = ((blocks,), ("F32",))
    for part, (part_shape, dtypes) in expected.items():
        key = parts.get(part)
        if key is None:
            raise CheckpointError(f"{where}: the weight's {part} ({weight_key}.{part}) is missing")
        found = source.shapes[key]
        if math.prod(found) != math.prod(part_shape) or source.dtypes[key] not in dtypes:
            raise CheckpointError(f"{source.where(key)}: {source.dtypes[key]} {list(found)}; a {qtype} weight of "
                                  f"shape {list(shape)} in blocks of {blocksize} needs {dtypes[0]} "
                                  f"{list(part_shape)}")
    return BnbWeight(qtype, shape, parts, blocksize, float(offset))


def _int8(source, weight_key: str, scale_key: str) -> BnbWeight:
    shape, dtype = source.shapes[weight_key], source.dtypes[weight_key]
    if dtype != "I8" or len(shape) != 2:
        raise CheckpointError(f"{source.where(weight_key)}: {dtype} {list(shape)} beside {scale_key}; an 8-bit "
                              "bitsandbytes weight is I8 (out, in)")
    if source.shapes[scale_key] != shape[:1] or source.dtypes[scale_key] != "F32":
        raise CheckpointError(f"{source.where(scale_key)}: {source.dtypes[scale_key]} "
                              f"{list(source.shapes[scale_key])}; expected F32 [{shape[0]}] (one scale per row)")
    return BnbWeight("INT8", tuple(shape), {"weight": weight_key, "scb": scale_key})


def find_bitsandbytes(source) -> tuple[dict[str, BnbWeight], set[str]]:
    """({weight key: BnbWeight}, the keys that only describe those weights) of a TensorSource."""
    weights: dict[str, BnbWeight] = {}
    for key in list(source.keys()):
        if QUANT_STATE in key:
            weight_key, _, kind = key.partition(QUANT_STATE)
            if kind not in ("nf4", "fp4"):
                raise CheckpointError(f"{source.where(key)}: bitsandbytes quant type {kind!r}; qistudio reads nf4 "
                                      "and fp4")
            if weight_key not in source:
                raise CheckpointError(f"{source.where(key)}: a quant state without its weight {weight_key!r}")
            weights[weight_key] = _four_bit(source, weight_key, kind.upper())
        elif key.endswith(".SCB"):
            weight_key = key.removesuffix(".SCB") + ".weight"
            if weight_key not in source:
                raise CheckpointError(f"{source.where(key)}: a row scale without its weight {weight_key!r}")
            weights[weight_key] = _int8(source, weight_key, key)
    described = {k for w in weights.values() for part, k in w.parts.items() if part != "weight"}
    described |= {k + QUANT_STATE + w.qtype.lower() for k, w in weights.items() if w.qtype != "INT8"}
    described |= {k.removesuffix(".weight") + ".weight_format" for k, w in weights.items() if w.qtype == "INT8"}
    return weights, described & set(source.keys())
