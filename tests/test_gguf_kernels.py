"""The Triton kernels that read quantised weights, run by Triton's CPU interpreter against ops/dequant.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_INTERPRETED = r'''
import torch
import bitsandbytes.functional as BF
from qistudio.memory.quant_linear import QuantizedLinear
from qistudio.ops import dequant_triton as K
from qistudio.ops.dequant import CODE_BOOKS
from qistudio.ops.gguf_quantize import quantize_gguf

torch.manual_seed(0)
rows = 40  # not a multiple of the kernels' 32-row tiles
layers = []
for qtype, k in (("Q8_0", 96), ("Q4_0", 64), ("Q4_K", 512), ("Q5_K", 256), ("Q6_K", 256)):
    weight = torch.randn(rows, k) * 0.05
    layers.append(QuantizedLinear(k, rows, qtype, {"weight": quantize_gguf(weight, qtype)}, compute_dtype=torch.float16))
for quant_type, nested in (("nf4", True), ("fp4", False)):
    weight = torch.randn(rows, 192) * 0.05
    packed, state = BF.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    parts = {"weight": packed, "weight_absmax": state.absmax,
             "weight_code": torch.tensor(CODE_BOOKS[quant_type.upper()])}
    offset = 0.0
    if nested:
        parts.update(weight_nested_absmax=state.state2.absmax, weight_nested_code=state.state2.code)
        offset = float(state.offset)
    layers.append(QuantizedLinear(192, rows, quant_type.upper(), parts, compute_dtype=torch.float16, blocksize=64,
                                  nested_offset=offset))
codes, scale, _ = BF.int8_vectorwise_quant((torch.randn(rows, 64) * 0.05).half())
layers.append(QuantizedLinear(64, rows, "INT8", {"weight": codes, "weight_scb": scale.float()},
                              compute_dtype=torch.float16))
for layer in layers:
    layer.bias.data = torch.randn(rows).half()
    weight, aux, code = K._operands(layer)
    for dtype in (torch.float16, torch.float32):  # the interpreter truncates bfloat16: not its CUDA rounding
        dense = K._dequantize_weight(weight, aux, code, K.QCODES[layer.quant_type], rows, layer.in_features,
                                     layer.blocksize, dtype)
        assert torch.equal(dense, layer.dequantized_weight(dtype)), (layer.quant_type, dtype)
    for tokens in (3, 40):  # fused decode-matmul (a few rows), then decode + F.linear (many)
        x = torch.randn(2, tokens, layer.in_features).half()
        y = K.quantized_linear_cuda(layer, x, layer.bias)
        reference = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
        assert y.shape == (2, tokens, rows) and y.dtype == torch.float16
        assert (y.float() - reference).abs().max() <= 2e-3 * reference.abs().max() + 1e-3, layer.quant_type
    x = torch.randn(37, layer.in_features).half()  # the fused kernel over three row tiles
    y = K._quantized_matmul(x, weight, aux, code, K.QCODES[layer.quant_type], rows, layer.blocksize, None)
    reference = x.float() @ layer.dequantized_weight(torch.float32).T
    assert (y.float() - reference).abs().max() <= 2e-3 * reference.abs().max() + 1e-3, layer.quant_type
print("ok")
'''


def test_quantized_weight_kernels_match_ops_dequant_in_the_interpreter():
    """Dense decode bit for bit (float16 and float32 out); matmuls within float16 output rounding."""
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{tests.parent}{os.pathsep}{tests}")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
