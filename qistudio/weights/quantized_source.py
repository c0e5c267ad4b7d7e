"""Checkpoints whose weights are quantised (GGUF files, bitsandbytes NF4 / int8 safetensors) read like any other,
and their linears built to keep those weights quantised.

`QuantizedSource` is a TensorSource that also reads `.gguf` files (gguf_io.py) and recognises bitsandbytes layouts
(nf4_io.py). It shows every weight under its own name with its real shape, so recognition (formats.py) and the
strict match (build.py) work unchanged; `dtypes` gives a quantised weight's type ("Q4_K", "NF4", ...), and the
tensors that only describe one (absmaxes, quant states, row scales) are hidden from `keys()`. `get` gives any
weight as a float tensor (decoded), for code that reads weights one by one; `place_quantized` swaps the model's
linears for QuantizedLinear layers holding the stored bytes, which is how a model is loaded.

GGUF types the layers keep quantised are those of ops/dequant.py's KEPT_QUANTIZED; the rest of what the gguf
package decodes (IQ1-IQ3, TQ1_0, TQ2_0, MXFP4, NVFP4) is decoded once at load, by that package, into the compute
dtype. A type neither can read is one error naming it, before anything is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..memory.quant_linear import QuantizedLinear
from ..ops import dequant
from .errors import CheckpointError
from .finite import FiniteCheck
from .gguf_io import GGUF_SUFFIX, GGUFFile
from .gguf_text_encoder import Join, check_architecture, joined_shape, joined_tensors
from .nf4_io import BnbWeight, find_bitsandbytes
from .safetensors_io import TensorSource

# GGUF types decoded at load through the gguf package (float32, llama.cpp's arithmetic).
_DECODED_BY_GGUF = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4",
                    "NVFP4")
_PLAIN = tuple(dequant.GGML_TORCH_DTYPES)


def readable_gguf_types() -> tuple[str, ...]:
    return (*_PLAIN, *dequant.KEPT_QUANTIZED, *_DECODED_BY_GGUF)


class QuantizedSource(TensorSource):
    """A TensorSource over safetensors, torch and GGUF files, with quantised weights shown as themselves."""

    def __init__(self, files: list[str | Path]):
        self._gguf: dict[Path, GGUFFile] = {}
        self.joined: dict[str, Join] = {}  # tensors a GGUF file stores split (llama.cpp's mmproj), shown joined
        self.quantized: dict[str, BnbWeight | str] = {}  # weight key -> its bitsandbytes parts, or its GGUF type
        super().__init__(files)
        self._check_gguf_types()
        bnb, described = find_bitsandbytes(self)
        for key, weight in bnb.items():
            self.quantized[key] = weight
            self.shapes[key], self.dtypes[key] = weight.shape, weight.qtype
        for key in described:  # still readable through get(); no longer weights of their own
            del self.shapes[key], self.dtypes[key]

    def _scan(self, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        if path.suffix.lower() != GGUF_SUFFIX:
            return super()._scan(path)
        gguf = self._gguf[path] = GGUFFile(path)
        check_architecture(path, gguf.metadata, gguf.tensors)
        found = {}
        for name, tensor in gguf.tensors.items():
            found[name] = (tensor.shape, tensor.type_name)
            if tensor.type_name not in _PLAIN:
                self.quantized[name] = tensor.type_name
        for name, join in joined_tensors(gguf.tensors).items():
            parts = [found.pop(part) for part in join.parts]
            shape = joined_shape([part_shape for part_shape, _ in parts], join)
            if shape is None:
                raise CheckpointError(f"{path}: tensors {', '.join(join.parts)} cannot be joined into {name} "
                                      f"(shapes {', '.join(str(list(s)) for s, _ in parts)})")
            types = {qtype for _, qtype in parts}
            found[name] = (shape, types.pop() if len(types) == 1 and types <= set(_PLAIN) else "F32")
            self.joined[name] = join
            for part in join.parts:  # read through the joined tensor only (decoded: get() below)
                self.quantized.pop(part, None)
        return found

    def gguf_metadata(self) -> dict[Path, dict]:
        """{GGUF file: its metadata} of this source's GGUF files."""
        return {path: gguf.metadata for path, gguf in self._gguf.items()}

    def _check_gguf_types(self) -> None:
        unreadable = sorted((t.type_name, str(path), t.name) for path, gguf in self._gguf.items()
                            for t in gguf.tensors.values() if t.type_name not in readable_gguf_types())
        if unreadable:
            qtype, path, name = unreadable[0]
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {qtype}, which qistudio cannot read "
                                  f"(readable: {', '.join(readable_gguf_types())})")

    def quant_type(self, key: str) -> str | None:
        """The quantised type of weight `key` ("Q4_K", "NF4", "INT8"), or None for a plain tensor."""
        found = self.quantized.get(key)
        return found if found is None or isinstance(found, str) else found.qtype

    def kept_quantized(self, key: str) -> bool:
        """Whether a linear can keep weight `key` as stored (else it is decoded at load)."""
        qtype = self.quant_type(key)
        return qtype is not None and qtype not in _DECODED_BY_GGUF

    def stored(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors of quantised weight `key`, named as QuantizedLinear takes them (views, not copies)."""
        found = self.quantized[key]
        if isinstance(found, str):
            return {"weight": self._gguf[self.file_of[key]].raw(key)}
        if found.qtype == "INT8":
            return {"weight": self._raw(key), "weight_scb": self._raw(found.parts["scb"])}
        tensors = {"weight": self._raw(key), "weight_absmax": self._raw(found.parts["absmax"]).reshape(-1),
                   "weight_code": dequant.code_book(found.qtype)}
        if found.nested:
            tensors["weight_nested_absmax"] = self._raw(found.parts["nested_absmax"]).reshape(-1)
            tensors["weight_nested_code"] = self._raw(found.parts["nested_quant_map"]).reshape(-1)
        return tensors

    def _raw(self, key: str) -> torch.Tensor:
        return super().get(key)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a float (quantised weights decoded: diffusers' / bitsandbytes' values in float32)."""
        path = self.file_of[name]
        if name in self.joined:
            join = self.joined[name]
            parts = [self._gguf_value(path, part) for part in join.parts]
            return torch.stack(parts, join.dim) if join.stack else torch.cat(parts, join.dim)
        if path in self._gguf:
            return self._gguf_value(path, name)
        if name not in self.quantized:
            return super().get(name)
        info = self.quantized[name]
        return decode_stored(self.stored(name), self.quant_type(name), self.shapes[name], info, torch.float32)

    def _gguf_value(self, path: Path, name: str) -> torch.Tensor:
        """A GGUF tensor as stored (plain types) or decoded to float32 (quantised types)."""
        gguf = self._gguf[path]
        tensor = gguf.tensors[name]
        if tensor.type_name in _PLAIN:
            dtype = dequant.GGML_TORCH_DTYPES[tensor.type_name]
            return gguf.raw(name).view(dtype).view(tensor.shape).clone()
        if tensor.type_name in _DECODED_BY_GGUF:
            return _decode_with_gguf(gguf.raw(name), tensor.type_name, tensor.shape)
        return dequant.dequantize_gguf(gguf.raw(name), tensor.type_name, tensor.shape, torch.float32)

    def close(self) -> None:
        super().close()
        for gguf in self._gguf.values():
            gguf.close()


def _decode_with_gguf(raw: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading {qtype} weights needs the gguf package (pip install 'qistudio[gguf]')",
                          name="gguf") from e
    values = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(values).reshape(shape)


def decode_stored(tensors: dict[str, torch.Tensor], qtype: str, shape, info, dtype: torch.dtype) -> torch.Tensor:
    """A quantised weight's stored tensors -> the dense weight in `dtype` (ops/dequant.py's arithmetic)."""
    if isinstance(info, str):
        return dequant.dequantize_gguf(tensors["weight"], qtype, tuple(shape), dtype)
    if qtype == "INT8":
        return dequant.dequantize_int8(tensors["weight"], tensors["weight_scb"], dtype)
    absmax = dequant.absmax_4bit(tensors["weight_absmax"], tensors.get("weight_nested_absmax"),
                                 tensors.get("weight_nested_code"), info.offset)
    return dequant.dequantize_4bit(tensors["weight"], absmax, tensors["weight_code"], tuple(shape), info.blocksize,
                                   dtype)


def open_source(files) -> TensorSource:
    """The TensorSource for a checkpoint's files: a QuantizedSource (which reads every format)."""
    return QuantizedSource(files)


def is_quantized(source: TensorSource, key: str) -> bool:
    return isinstance(source, QuantizedSource) and source.quant_type(key) is not None


def _scales(tensors: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """The float scales a quantised weight's values are multiples of: NaN or infinity there spoils the weight."""
    if "weight_scb" in tensors:
        return tensors["weight_scb"]
    if "weight_absmax" in tensors:
        return tensors.get("weight_nested_absmax", tensors["weight_absmax"]).float()
    kind = dequant.GGML_BY_NAME[qtype]
    blocks = tensors["weight"].reshape(-1, kind.nbytes)
    starts = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q4_1": (0, 2),
              "Q5_1": (0, 2)}.get(qtype, (0,))
    return torch.cat([blocks[:, s : s + 2].contiguous().view(torch.float16).reshape(-1) for s in starts])


def place_quantized(model: nn.Module, source: TensorSource, sources: dict[str, str], dtype: torch.dtype,
                    device) -> None:
    """Replace each nn.Linear whose weight `source` keeps quantised by a QuantizedLinear holding the stored tensors
    on `device` (bias left to the loader), and drop that weight from `sources` (our name -> checkpoint key). Other
    quantised tensors stay in `sources`: `get` decodes them. Every placed weight's scales are checked finite."""
    if not isinstance(source, QuantizedSource):
        return
    check = FiniteCheck()
    for name, key in list(sources.items()):
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if param_name != "weight" or type(module) is not nn.Linear or not source.kept_quantized(key):
            continue
        qtype = source.quant_type(key)
        # In host memory the weight stays a view of the file's private map (pages the kernel can drop and read
        # again; the memory manager offloads such a model without a pinned copy: memory/mapped.py).
        tensors = {part: t.to(device) if part == "weight" else t.to(device, copy=True)
                   for part, t in source.stored(key).items()}
        info = source.quantized[key]
        layer = QuantizedLinear(module.in_features, module.out_features, qtype, tensors, module.bias is not None,
                                dtype, getattr(info, "blocksize", 0), getattr(info, "offset", 0.0))
        if module.bias is not None:
            layer.bias = module.bias  # still the meta placeholder: the loader assigns it
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        del sources[name]
        check.add(key, _scales(tensors, qtype))
    failures = check.failures()
    if failures:
        shown = ", ".join(source.where(k) for k in failures[:5])
        raise CheckpointError(f"{len(failures)} quantised weights have NaN or infinite scales (the model would "
                              f"produce NaN images): {shown}")
    source.verified.update(check.names)


def refuse_quantized_on_disk(files) -> None:
    """offload_device="disk" streams float blocks from their files; a quantised checkpoint rests in host memory."""
    source = open_source(files)
    try:
        quantized = next((key for key in source.keys() if source.quant_type(key) is not None), None)
        if quantized is not None:
            raise ValueError(f"{source.where(quantized)} is stored as {source.quant_type(quantized)}: "
                             "offload_device='disk' streams float weights from their files; a quantised model's "
                             "weights are small enough to rest in host memory: use offload_device='cpu'")
    finally:
        source.close()
