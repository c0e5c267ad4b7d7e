"""FP8 compute from GGUF Q8_0 files: Q8_0 linears converted to FP8Linear (float8_e4m3fn, per-channel scales) where
the GPU has FP8. On the CPU the conversion runs with the device check forced (supported=True)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from conftest import rel_err  # noqa: E402
from gguf_files import encode, mixed_types, write_gguf  # noqa: E402
from lora_files import Inputs  # noqa: E402
from qistudio.components import Components  # noqa: E402
from qistudio.memory.fp8_linear import FP8_DTYPE, FP8Linear, dit_fp8_predicate, quantize_weight  # noqa: E402
from qistudio.memory.gguf_fp8 import convert_q8_0_linears, fp8_compute_from_gguf, fp8_from_q8_0  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear  # noqa: E402
from qistudio.memory.setup import enable_fp8_compute  # noqa: E402
from qistudio.ops import dequant  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402


def _q8_0_layer(out_features=48, in_features=256, seed=0) -> QuantizedLinear:
    """A Q8_0 layer from the gguf package's quantiser, its blocks' scales spread over 3 decades (outlier blocks)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    decades = torch.empty(out_features, in_features // 32, 1).uniform_(-2, 1, generator=generator)
    weight *= (10**decades).expand(-1, -1, 32).reshape(out_features, in_features)
    raw = torch.from_numpy(encode(weight, "Q8_0")[0])
    layer = QuantizedLinear(in_features, out_features, "Q8_0", {"weight": raw}, bias=True,
                            compute_dtype=torch.float32)
    layer.bias.data = torch.randn(out_features, generator=generator)
    return layer


def test_q8_0_converts_to_fp8_in_one_rounding():
    import gguf

    layer = _q8_0_layer()
    fp8 = fp8_from_q8_0(layer)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.shape == (48,) and torch.equal(fp8.bias, layer.bias)
    # The file's weights in float32 are exact (the gguf package's float32 decode agrees bit for bit) ...
    exact = dequant.q8_0_float32(layer.weight, layer.weight_shape)
    package = gguf.quants.dequantize(layer.weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(exact, torch.from_numpy(package).reshape(exact.shape))
    # ... and the FP8 weight is their one FP8 rounding, bit for bit.
    weight, scale = quantize_weight(exact)
    assert torch.equal(fp8.weight.view(torch.uint8), weight.view(torch.uint8)) and torch.equal(fp8.weight_scale, scale)
    # Dequantise (diffusers' float16 arithmetic), then FP8-quantise: the same, but where the float16 rounding moved a
    # value across an e4m3 rounding boundary (then one e4m3 step apart).
    twice, twice_scale = quantize_weight(layer.dequantized_weight(torch.float32))
    assert torch.equal(twice_scale, scale)
    steps = (fp8.weight.view(torch.uint8).to(torch.int16) - twice.view(torch.uint8).to(torch.int16)).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    # FP8's tolerance against the Q8_0 weights: 2^-4 relative, or 2^-10 of the row's scale (subnormals).
    converted = fp8.dequantized_weight(torch.float32)
    assert ((converted - exact).abs() <= torch.maximum(exact.abs() * 2**-4, scale[:, None] * 2**-10)).all()
    x = torch.randn(5, 256)
    assert rel_err(fp8(x), layer(x)) < 0.03


@pytest.fixture(scope="module")
def q8_0_dit(tmp_path_factory):
    """(diffusers' tiny DiT, our DiT from its Q8_0 GGUF file), config.json beside the file for the RoPE axes."""
    from tiny_models import reference_dit

    folder = tmp_path_factory.mktemp("q8_0")
    reference = reference_dit()
    reference.save_config(folder)
    path = write_gguf(folder / "dit-Q8_0.gguf", reference.state_dict(), mixed_types(("Q8_0",)))
    return reference, path


def test_a_q8_0_dit_computes_from_fp8_weights(q8_0_dit):
    _, path = q8_0_dit
    _, ours = load_model([path], dtype=torch.float32)
    inputs = Inputs()
    expected = inputs.ours(ours)
    count = sum(isinstance(m, QuantizedLinear) for m in ours.transformer_blocks.modules())
    assert convert_q8_0_linears(ours, dit_fp8_predicate, supported=False) == 0  # no FP8 GPU: left as they are
    assert fp8_compute_from_gguf(ours, dit_fp8_predicate, supported=True) == count
    assert not any(isinstance(m, QuantizedLinear) for m in ours.modules())
    assert sum(isinstance(m, FP8Linear) for m in ours.modules()) == count
    # Upcast compute on the CPU: the FP8 weights' own error (about 2.6% per weight, less at the output).
    assert rel_err(inputs.ours(ours), expected) < 0.05
    enable_fp8_compute(Components(dit=ours))  # nothing left to convert: W8A8 switched on as for any FP8 DiT
    assert all(m.fp8_compute for m in ours.modules() if isinstance(m, FP8Linear))


def test_fp8_compute_without_an_fp8_gpu_or_from_other_types_is_one_clear_error(q8_0_dit, tmp_path):
    reference, path = q8_0_dit
    _, ours = load_model([path], dtype=torch.float32)
    if not torch.cuda.is_available():  # the CPU has no FP8 tensor cores
        with pytest.raises(ValueError, match=r"from Q8_0 weights needs a GPU with FP8 tensor cores \(compute "
                                             r"capability 8.9 or newer\)"):
            enable_fp8_compute(Components(dit=ours))
    q4_0 = write_gguf(path.with_name("dit-Q4_0.gguf"), reference.state_dict(), mixed_types(("Q4_0",)))
    _, ours = load_model([q4_0], dtype=torch.float32)
    with pytest.raises(ValueError, match="linears are stored as Q4_0, which compute through their dequantising"):
        fp8_compute_from_gguf(ours, dit_fp8_predicate, supported=True)
