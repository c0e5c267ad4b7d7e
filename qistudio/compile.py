"""Regional torch.compile: the repeated transformer block compiled once and reused by every block.

Why regional: the 60 DiT blocks share one code path, so compiling the block (not the whole model) costs one
compilation (about a minute for the full-size block) instead of sixty, and every fusion the whole-model compile
would find inside a block is found here too; what lies between blocks is a handful of small ops. The block
compiles with fullgraph=True: a graph break inside would silently cost the fusions, so it is an error instead.
Compiled graphs and Triton kernels are cached on disk by torch (the FX graph and autotune caches, on by default),
so a second process warms up in seconds, not minutes.

The fused kernels of ops/ (joint q/k norm + RoPE, the adaptive LayerNorms with their gated residual, FP8 GELU +
quantisation, the FP8 GEMV) are custom ops that the compiled graph calls as they are; element-wise work around them
is fused by inductor.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ops.attention import resolve_automatic_backend
from .ops.linear_gelu import resolve_quack
from .ops.linear_swiglu import resolve_swiglu

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats: `transformer_blocks` (DiT, InstantX ControlNet) and `controlnet_blocks`."""
    blocks = []
    for name in ("transformer_blocks", "controlnet_blocks"):
        blocks.extend(getattr(model, name, None) or [])
    return blocks


def compile_repeated_blocks(model: nn.Module, mode: str | None = None, dynamic: bool | None = None,
                            backend: str = "inductor", fullgraph: bool = True) -> int:
    """Compile each repeated block of `model` in place (nn.Module.compile); returns how many. `backend` other
    than inductor is for tests (tracing without code generation). Training passes fullgraph=False: peft's LoRA
    layers and the training streamer's hooks around a block may break a graph, which must not stop a run."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; use one of {', '.join(str(m) for m in COMPILE_MODES)} (CUDA "
                         "graphs, 'reduce-overhead', do not mix with the offloading hooks, so they are not offered)")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile")
    # Each block instance is the same code with other parameters: allow one entry per instance, as a safety
    # margin over the guard failures a new image size (dynamic shapes) adds.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    resolve_automatic_backend()  # the attention kernel is chosen before tracing, so the graphs use it
    resolve_quack()  # likewise the MLP's GEMM
    resolve_swiglu()  # and Qwen-Image 2.1's gated one
    for block in blocks:
        block.compile(fullgraph=fullgraph, mode=None if mode == "default" else mode, dynamic=dynamic, backend=backend)
    return len(blocks)
