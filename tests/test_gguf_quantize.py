"""Our quantisers: the gguf package's bytes where it has a quantiser, blocks its decoder reads back where it has
none (the K-quants), bitsandbytes' bytes for NF4 / FP4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qistudio.ops.dequant import dequantize_gguf  # noqa: E402
from qistudio.ops.gguf_quantize import QUANTIZABLE, quantize_gguf  # noqa: E402
from qistudio.ops.nf4_quantize import quantize_4bit  # noqa: E402

# Relative L2 error of each type on Gaussian weights (what the format can do; ours measured at or below these).
ERROR_BOUND = {"Q8_0": 0.008, "Q4_0": 0.1, "Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.025}


def _weights() -> torch.Tensor:
    weight = torch.randn(48, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    weight[5] = 0.0  # an all-zero row: scales of zero, nothing divides by them
    weight[7, :256] = weight[7, :256].abs()  # a block without negative values (K-quants: min 0)
    weight[9, 3] = 1.5  # one outlier
    return weight


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_quantized_blocks_decode_with_the_gguf_package(qtype):
    weight = _weights()
    raw = quantize_gguf(weight, qtype)
    kind = gguf.GGMLQuantizationType[qtype]
    assert tuple(raw.shape) == (48, 512 // gguf.GGML_QUANT_SIZES[kind][0] * gguf.GGML_QUANT_SIZES[kind][1])
    if qtype in ("Q8_0", "Q4_0"):  # the package quantises these: the same bytes
        assert np.array_equal(raw.numpy(), gguf.quants.quantize(weight.numpy(), kind))
    decoded = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), kind))
    assert torch.equal(decoded[5], torch.zeros(512))
    error = ((decoded - weight).norm() / weight.norm()).item()
    assert error < ERROR_BOUND[qtype]
    # Our decoder (float16 steps) and the package's (float32) read the same blocks to within float16 rounding.
    ours = dequantize_gguf(raw, qtype, tuple(weight.shape), torch.float32)
    assert (ours - decoded).abs().max() <= 1e-3 * decoded.abs().max()


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 values, got 64"):
        quantize_gguf(torch.zeros(4, 64), "Q4_K")


@pytest.mark.parametrize("qtype", ["NF4", "FP4"])
@pytest.mark.parametrize("shape", [(48, 512), (7, 45)])  # whole blocks; a tail block and an odd count of codes
def test_4bit_quantizer_writes_bitsandbytes_bytes(qtype, shape):
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05
    packed, absmax = quantize_4bit(weight, qtype, blocksize=64)
    expected, state = functional.quantize_4bit(weight, blocksize=64, quant_type=qtype.lower())
    assert torch.equal(packed, expected) and torch.equal(absmax, state.absmax)
