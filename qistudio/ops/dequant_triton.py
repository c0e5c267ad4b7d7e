"""Triton kernels that read quantised weights (GGUF Q8_0, Q4_0, Q4_K, Q5_K, Q6_K; bitsandbytes NF4 / FP4 and int8)
where they rest, on CUDA.

Design note. One decode function per type turns a (BLOCK_N, BLOCK_K) tile of weight coordinates into the values
ops/dequant.py computes, with the same roundings: GGUF's float16 steps are float32 operations rounded to float16
(exactly what torch's float16 arithmetic does), the rounding between a product and the following add written out,
so the compiler cannot contract them into one fused multiply-add. Two kernels use it:
- `dequantize`: the dense (N, K) weight in the activations' dtype, bit for bit ops/dequant.py's, for cuBLAS to
  multiply. Used where many rows meet the weight (image tokens): the decode reads the quantised bytes once and
  writes the dense weight once, a few percent of a GEMM thousands of rows deep.
- `matmul`: y = x @ W^T + b for at most `FUSED_MAX_ROWS` rows (the modulation linears on one timestep embedding,
  short text), decoding inside the K loop: the quantised bytes are read once and no dense copy is written, where
  reading the weight is the whole cost. Its sums run in another order than cuBLAS's: equal to within float32
  accumulation, not bit for bit.
bitsandbytes' nested absmaxes are decoded by torch first (one small pass, exactly its arithmetic); the kernels read
float32 absmaxes.

The kernels run in Triton's CPU interpreter too (TRITON_INTERPRET=1), where tests/test_gguf_kernels.py checks them
against ops/dequant.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dequant

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Type codes the kernels branch on (compile-time constants).
QCODES = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q5_K": 3, "Q6_K": 4, "NF4": 5, "FP4": 5, "INT8": 6}
# Up to this many rows the fused kernel runs (it takes any number, 16 per program along the rows: each row tile
# decodes the weight again). Where the crossover with decode + cuBLAS lies is for a GPU to measure
# (bench/quantized.py); 16 is where reading the weight is certainly the whole cost.
FUSED_MAX_ROWS = 16


def supports_cuda(layer, x: torch.Tensor) -> bool:
    """Whether a kernel here computes `layer` (a QuantizedLinear) for input `x` on CUDA."""
    if triton is None or layer.quant_type not in QCODES or x.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        return False
    out_features, in_features = layer.weight_shape
    if layer.family == "gguf":
        # Rows of whole blocks, one per output feature (not a file reshaped to rows of 256).
        return layer.weight.dim() == 2 and layer.weight.shape[0] == out_features
    if layer.family == "4bit":
        return in_features % 2 == 0 and (out_features * in_features) % layer.blocksize == 0
    return True


def _operands(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored weight, first auxiliary, second auxiliary) as the kernels take them."""
    weight = layer.weight.contiguous()  # the kernels index rows of bytes (views of an offload slot already are)
    if layer.family == "4bit":
        return weight, layer._absmax().contiguous(), layer.weight_code.contiguous()
    if layer.family == "int8":
        return weight, layer.weight_scb.float().contiguous(), weight
    return weight, weight, weight  # GGUF blocks carry their own scales


def _as_halves(weight: torch.Tensor) -> torch.Tensor | None:
    """Q8_0 rows of bytes viewed as int16 for `_q8_0_tile`; None where the bytes do not start on an even address
    (a view at an odd offset: the general kernel reads those)."""
    if weight.data_ptr() % 2 or weight.shape[-1] % 2:
        return None
    return weight.view(torch.int16)


def quantized_linear_cuda(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """layer(x) through the kernels (see the design note for which)."""
    out_features, in_features = layer.weight_shape
    weight, aux, code = _operands(layer)
    qcode = QCODES[layer.quant_type]
    rows = x.shape[:-1].numel()
    if rows <= FUSED_MAX_ROWS and x.dtype != torch.float32:
        out = torch.ops.qistudio.quantized_matmul(x.reshape(rows, in_features), weight, aux, code, qcode,
                                                  out_features, layer.blocksize, bias)
        return out.reshape(*x.shape[:-1], out_features)
    dense = torch.ops.qistudio.dequantize_weight(weight, aux, code, qcode, out_features, in_features,
                                                 layer.blocksize, x.dtype)
    return F.linear(x, dense, bias)


if triton is not None:

    @triton.jit
    def _half_at(ptr, mask):
        """The little-endian float16 at byte pointers `ptr`, as float32."""
        low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _byte_at(ptr, mask):
        return tl.load(ptr, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _round16(value):
        """A float32 value rounded to float16 and back: one float16 operation's result."""
        return value.to(tl.float16).to(tl.float32)

    @triton.jit
    def _k_scale_min(base, sub, mask):
        """Q4_K / Q5_K: the 6-bit scale and min of sub-block `sub` (0-7) from the 12 bytes at base + 4."""
        first = sub < 4
        low_index = tl.where(first, sub, sub - 4)
        b_low = _byte_at(base + 4 + low_index, mask)  # byte j of the first four: scale j (and high bits of j + 4)
        b_min = _byte_at(base + 8 + low_index, mask)  # byte 4 + j: min j (and high bits of min j + 4)
        b_high = _byte_at(base + 12 + low_index, mask)  # byte 8 + j: low nibbles of scale / min j + 4
        scale = tl.where(first, b_low & 63, (b_high & 15) | ((b_low >> 6) << 4))
        minimum = tl.where(first, b_min & 63, (b_high >> 4) | ((b_min >> 6) << 4))
        return scale.to(tl.float32), minimum.to(tl.float32)

    @triton.jit
    def _decode(w_ptr, aux_ptr, code_ptr, rows, cols, n_total, k_total, blocksize, QCODE: tl.constexpr):
        """The float32 values of weight[rows, cols] ((BN, 1) and (1, BK) index tensors), as ops/dequant.py."""
        mask = (rows < n_total) & (cols < k_total)
        if QCODE == 0:  # Q8_0: 34-byte blocks of 32: float16 d, 32 int8
            base = w_ptr + rows.to(tl.int64) * (k_total // 32 * 34) + (cols // 32) * 34
            q = _byte_at(base + 2 + cols % 32, mask)
            q = tl.where(q > 127, q - 256, q)
            value = _round16(_half_at(base, mask) * q.to(tl.float32))
        elif QCODE == 1:  # Q4_0: 18-byte blocks of 32: float16 d, 16 bytes of nibbles (low: 0-15, high: 16-31)
            j = cols % 32
            base = w_ptr + rows.to(tl.int64) * (k_total // 32 * 18) + (cols // 32) * 18
            byte = _byte_at(base + 2 + j % 16, mask)
            q = tl.where(j < 16, byte & 15, byte >> 4) - 8
            value = _round16(_half_at(base, mask) * q.to(tl.float32))
        elif QCODE == 2 or QCODE == 3:  # Q4_K / Q5_K: 256 per block, 8 sub-blocks of 32 with 6-bit scale and min
            j = cols % 256
            sub = j // 32
            if QCODE == 2:  # d, dmin, 12 bytes of scales, 128 bytes of nibbles
                base = w_ptr + rows.to(tl.int64) * (k_total // 256 * 144) + (cols // 256) * 144
                q = (_byte_at(base + 16 + (sub // 2) * 32 + j % 32, mask) >> ((sub % 2) * 4)) & 15
            else:  # d, dmin, 12 bytes of scales, 32 bytes of fifth bits, 128 bytes of nibbles
                base = w_ptr + rows.to(tl.int64) * (k_total // 256 * 176) + (cols // 256) * 176
                q = (_byte_at(base + 48 + (sub // 2) * 32 + j % 32, mask) >> ((sub % 2) * 4)) & 15
                q = q | (((_byte_at(base + 16 + j % 32, mask) >> sub) & 1) << 4)
            scale, minimum = _k_scale_min(base, sub, mask)
            step = _round16(_half_at(base, mask) * scale)
            offset = _round16(_half_at(base + 2, mask) * minimum)
            value = _round16(_round16(step * q.to(tl.float32)) - offset)
        elif QCODE == 4:  # Q6_K: 210 bytes per 256: 128 low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d
            j = cols % 256
            half = j // 128
            rest = j % 128
            base = w_ptr + rows.to(tl.int64) * (k_total // 256 * 210) + (cols // 256) * 210
            low = (_byte_at(base + half * 64 + rest % 64, mask) >> ((rest // 64) * 4)) & 15
            high = (_byte_at(base + 128 + half * 32 + rest % 32, mask) >> ((rest // 32) * 2)) & 3
            scale = _byte_at(base + 192 + j // 16, mask)
            scale = tl.where(scale > 127, scale - 256, scale)
            step = _round16(_half_at(base + 208, mask) * scale.to(tl.float32))
            value = _round16(step * ((low | (high << 4)) - 32).to(tl.float32))
        elif QCODE == 5:  # bitsandbytes 4-bit: flattened codes, high nibble first; float32 absmax per block
            flat = rows.to(tl.int64) * k_total + cols
            byte = _byte_at(w_ptr + flat // 2, mask)
            q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
            absmax = tl.load(aux_ptr + flat // blocksize, mask=mask, other=0.0)
            value = tl.load(code_ptr + q, mask=mask, other=0.0) * absmax
        else:  # bitsandbytes int8 rows, float32 row scales: q * scale * (1 / 127)
            q = tl.load(w_ptr + rows.to(tl.int64) * k_total + cols, mask=mask, other=0).to(tl.float32)
            value = q * tl.load(aux_ptr + rows, mask=rows < n_total, other=0.0) * 7.874015718698502e-3
        return value

    @triton.jit
    def _q8_0_tile(w16_ptr, row_start, block_start, n_total, k_blocks, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
        """Q8_0 weight[row_start:+BLOCK_N, 32 block_start:+32 BLOCKS] as float32 (BLOCK_N, 32 BLOCKS), read through
        an int16 view of the bytes: a 34-byte block is 17 halves (d, then 16 pairs of int8), so each pair is one
        load and d one per block, where `_decode` loads three bytes per value (the rows of 34-byte blocks allow no
        wider aligned load). Values as `_decode`'s."""
        rows = (row_start + tl.arange(0, BLOCK_N))[:, None, None]
        blocks = (block_start + tl.arange(0, BLOCKS))[None, :, None]
        mask = (rows < n_total) & (blocks < k_blocks)
        base = w16_ptr + rows.to(tl.int64) * (k_blocks * 17) + blocks * 17
        d = tl.load(base, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)  # (BN, BLOCKS, 1)
        pairs = tl.load(base + 1 + tl.arange(0, 16)[None, None, :], mask=mask, other=0).to(tl.int32)
        low, high = (pairs << 24) >> 24, pairs >> 8  # little-endian: value 2i in the low byte; both sign-extended
        q = tl.join(low, high).to(tl.float32)  # (BN, BLOCKS, 16, 2): value 2i + j at [..., i, j]
        value = _round16(tl.expand_dims(d, 3) * q)
        return tl.reshape(value, (BLOCK_N, BLOCKS * 32))

    @triton.jit
    def _dequantize_q8_0_kernel(w16_ptr, out_ptr, n_total, k_total,
                                BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
        value = _q8_0_tile(w16_ptr, tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCKS, n_total, k_total // 32,
                           BLOCK_N, BLOCKS)
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
        cols = (tl.program_id(1) * BLOCKS * 32 + tl.arange(0, BLOCKS * 32))[None, :]
        tl.store(out_ptr + rows.to(tl.int64) * k_total + cols, value.to(out_ptr.dtype.element_ty),
                 mask=(rows < n_total) & (cols < k_total))

    @triton.jit
    def _dequantize_kernel(w_ptr, aux_ptr, code_ptr, out_ptr, n_total, k_total, blocksize,
                           QCODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
        cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
        value = _decode(w_ptr, aux_ptr, code_ptr, rows, cols, n_total, k_total, blocksize, QCODE)
        tl.store(out_ptr + rows.to(tl.int64) * k_total + cols, value.to(out_ptr.dtype.element_ty),
                 mask=(rows < n_total) & (cols < k_total))

    @torch.library.triton_op("qistudio::dequantize_weight", mutates_args=())
    def _dequantize_weight(weight: torch.Tensor, aux: torch.Tensor, code: torch.Tensor, qcode: int, n: int, k: int,
                           blocksize: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(n, k, dtype=dtype, device=weight.device)
        halves = _as_halves(weight) if qcode == QCODES["Q8_0"] else None
        if halves is not None:
            blocks = 8  # 256 values per row tile, as the general kernel's
            torch.library.wrap_triton(_dequantize_q8_0_kernel)[(triton.cdiv(n, 32), triton.cdiv(k, 32 * blocks))](
                halves, out, n, k, BLOCK_N=32, BLOCKS=blocks, num_warps=4)
            return out
        block_n, block_k = 32, 256
        torch.library.wrap_triton(_dequantize_kernel)[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            weight, aux, code, out, n, k, blocksize, QCODE=qcode, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        return out

    @triton.jit
    def _matmul_kernel(x_ptr, w_ptr, aux_ptr, code_ptr, bias_ptr, out_ptr, m_total, n_total, k_total, blocksize,
                       HAS_BIAS: tl.constexpr, QCODE: tl.constexpr, HALVES: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ids = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, k_total, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row_ids[:, None].to(tl.int64) * k_total + ks[None, :],
                        mask=(row_ids[:, None] < m_total) & (ks[None, :] < k_total), other=0.0)
            if HALVES:  # Q8_0 through the int16 view of its bytes (see _q8_0_tile)
                w = _q8_0_tile(w_ptr, tl.program_id(0) * BLOCK_N, start // 32, n_total, k_total // 32, BLOCK_N,
                               BLOCK_K // 32)
            else:
                w = _decode(w_ptr, aux_ptr, code_ptr, cols_n[:, None], ks[None, :], n_total, k_total, blocksize,
                            QCODE)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_n, mask=cols_n < n_total, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row_ids[:, None].to(tl.int64) * n_total + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(row_ids[:, None] < m_total) & (cols_n[None, :] < n_total))

    @torch.library.triton_op("qistudio::quantized_matmul", mutates_args=())
    def _quantized_matmul(x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor, code: torch.Tensor, qcode: int,
                          n: int, blocksize: int, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        rows, k = x.shape
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        block_n = 16  # many small programs: reading the weight is the whole cost, spread it over every SM
        has_bias = bias is not None
        halves = _as_halves(weight) if qcode == QCODES["Q8_0"] else None
        torch.library.wrap_triton(_matmul_kernel)[(triton.cdiv(n, block_n), triton.cdiv(rows, 16))](
            x, weight if halves is None else halves, aux, code, bias.to(x.dtype) if has_bias else x, out, rows, n, k,
            blocksize, HAS_BIAS=has_bias, QCODE=qcode, HALVES=halves is not None, ROWS=16, BLOCK_N=block_n,
            BLOCK_K=256, num_warps=4, num_stages=3)
        return out
