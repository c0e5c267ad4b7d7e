"""Our fast paths by name, switched on and off around a measurement: the fused kernels, the attention backend and
regional compile (which nn.Module.compile lets us undo: the block's compiled call is dropped, eager returns).

Every switch here is the library's own (ops/*.set_fused_*, ops.attention.set_attention_backend,
compile.compile_repeated_blocks); this file only restores them afterwards, so a test or a bench row leaves the
process as it found it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from qistudio.compile import compile_repeated_blocks, repeated_blocks
from qistudio.models.packed_linears import set_packed_text_qkv
from qistudio.ops.ada_norm import set_fused_ada_norm
from qistudio.ops.attention import set_attention_backend
from qistudio.ops.linear_gelu import set_fused_linear_gelu, set_quack_linear_gelu
from qistudio.ops.linear_swiglu import set_fused_swiglu
from qistudio.ops.qk_norm_rope import set_fused_qk_norm_rope

# Each fused op's switch (on by default in the library).
FUSED_SWITCHES = {"ada_norm": set_fused_ada_norm, "linear_gelu": set_fused_linear_gelu,
                  "quack_gelu": set_quack_linear_gelu, "qk_norm_rope": set_fused_qk_norm_rope,
                  "text_qkv": set_packed_text_qkv, "swiglu": set_fused_swiglu}


def reset() -> None:
    """The library's defaults: every fused op on, the attention backend chosen automatically."""
    for switch in FUSED_SWITCHES.values():
        switch(True)
    set_attention_backend(None)


@contextmanager
def fused_off(*names: str):
    """The named fused ops (all of them when none is named) switched off inside the block."""
    unknown = set(names) - set(FUSED_SWITCHES)
    if unknown:
        raise ValueError(f"unknown fused ops {sorted(unknown)}; known: {', '.join(FUSED_SWITCHES)}")
    chosen = names or tuple(FUSED_SWITCHES)
    for name in chosen:
        FUSED_SWITCHES[name](False)
    try:
        yield
    finally:
        for name in chosen:
            FUSED_SWITCHES[name](True)


@contextmanager
def attention_backend(name: str | None):
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(None)


def uncompile(model: nn.Module) -> None:
    """Back to eager: drop each repeated block's compiled call (what nn.Module.compile installed)."""
    for block in repeated_blocks(model):
        block._compiled_call_impl = None


@contextmanager
def compiled(model: nn.Module, backend: str = "inductor", mode: str | None = None):
    """The model's repeated blocks compiled (the library's regional compile) inside the block, eager after."""
    compile_repeated_blocks(model, mode=mode, backend=backend)
    try:
        yield model
    finally:
        uncompile(model)
