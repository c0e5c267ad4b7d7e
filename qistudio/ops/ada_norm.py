"""The DiT block's adaptive LayerNorms in one pass each: [x + gate * update ->] LayerNorm -> (1 + scale), + shift.

Reference forms (`modulated_norm_reference`, `gated_residual_norm_reference`; any device, differentiable) are the
block's eager arithmetic: a bf16 rounding after each operation, LayerNorm statistics in float32.

Fused form (CUDA inference, Triton): a program takes a few token rows of one sample and reads each input from
HBM once and writes each output once: either holding whole rows in registers, or (the default) in chunks of
columns, re-reading the rows it has just touched from L2 once (ADA_LAUNCH below). It computes in float32 and rounds
each output once, as inductor's fused kernels (and so diffusers' compiled model) do; `modulated_norm_float32` is that arithmetic in PyTorch. Compiled,
the same work was a Welford reduction looping over each row two or three times with a division per element,
compute-bound at a power-limited H100's clocks: at 1328x1328, batch 2, the norm before attention went from 141 to
about 75 us, the gated residual + norm before the MLP from 144 to about 115 us (bench/RESULTS.md, fourth pass).

Modulation vectors (shift, scale, gate) are (B, 1, D) rows of the modulation linear's output, or (B, N, D) per
token (Edit-2511's zero_cond_t): any strides over batch and token, contiguous over D.

Not used under W8A8 (FP8 compute): there inductor fuses the normalised rows' per-token quantisation into the norm,
which a separate kernel here would split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import triton_inference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference forms serve
    triton = None


def modulated_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def gated_residual_norm_reference(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + gate * update
    return x, modulated_norm_reference(x, shift, scale, eps)


def modulated_norm_float32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused kernels' arithmetic: float32 throughout, one rounding of the output."""
    x32 = x.float()
    centred = x32 - x32.mean(dim=-1, keepdim=True)
    normed = centred * torch.rsqrt((centred * centred).mean(dim=-1, keepdim=True) + eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual_norm_float32(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = (x.float() + gate.float() * update.float()).to(x.dtype)
    return x, modulated_norm_float32(x, shift, scale, eps)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   fused: bool = True) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x (B, S, D), shift and scale (B, 1|S, D)."""
    if fused and _can_fuse(x, shift, scale):
        return torch.ops.qistudio.modulated_norm(x, shift, scale, eps)
    return modulated_norm_reference(x, shift, scale, eps)


def gated_residual_norm(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                        scale: torch.Tensor, eps: float, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * update, modulated_norm of that); x and update (B, S, D), the vectors (B, 1|S, D)."""
    if fused and _can_fuse(x, update, gate, shift, scale):
        return torch.ops.qistudio.gated_residual_norm(x, update, gate, shift, scale, eps)
    return gated_residual_norm_reference(x, update, gate, shift, scale, eps)


def _can_fuse(x: torch.Tensor, *others: torch.Tensor) -> bool:
    if _disabled or not triton_inference(x, *others) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.dim() != 3 or x.stride(-1) != 1:
        return False
    batch, seq, dim = x.shape
    return all(t.dtype == x.dtype and t.dim() == 3 and t.shape[0] == batch and t.shape[1] in (1, seq)
               and t.shape[2] == dim and t.stride(-1) == 1 for t in others)


_disabled = False


def set_fused_ada_norm(enabled: bool) -> None:
    """Switch the fused kernels off (or back on), for comparisons."""
    global _disabled
    _disabled = not enabled


if triton is not None:

    # A program takes ROWS tokens of one sample (grid: token blocks x batch), so modulation vectors shared by
    # every token (the (B, 1, D) rows of the modulation linear) are loaded once per program, not once per token:
    # those loads came from L2 at nearly the bytes of the HBM traffic itself. Every load is issued before the
    # reductions, so a program waits on memory once.
    @triton.jit
    def _tile_offsets(batch, tokens, batch_stride, token_stride, cols, PER_TOKEN: tl.constexpr):
        # (ROWS, BLOCK) offsets of per-token rows, or of one (1, BLOCK) row when the tensor broadcasts over tokens.
        offsets = batch * batch_stride + cols[None, :]
        if PER_TOKEN:  # a constexpr branch: compiled alone, so the shape may change in it
            offsets = offsets + tokens[:, None] * token_stride
        return offsets

    @triton.jit
    def _norm_modulate_store(x, shift, scale, offsets, mask, dim, out_ptr, eps):
        x32 = x.to(tl.float32)
        mean = tl.sum(x32, axis=1)[:, None] / dim
        centred = tl.where(mask, x32 - mean, 0.0)
        inv_std = tl.rsqrt(tl.sum(centred * centred, axis=1)[:, None] / dim + eps)
        out = centred * inv_std * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    # Two kernels, not one with a flag: a triton_op must not pass one output tensor as two arguments (compiled,
    # each mutated argument is functionalised on its own).
    @triton.jit
    def _modulated_norm_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, seq, dim, x_batch_stride, x_token_stride,
                               shift_batch_stride, shift_token_stride, scale_batch_stride, scale_token_stride, eps,
                               MOD_PER_TOKEN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        batch = tl.program_id(1).to(tl.int64)
        tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = (tokens < seq)[:, None] & (cols < dim)[None, :]
        x = tl.load(x_ptr + _tile_offsets(batch, tokens, x_batch_stride, x_token_stride, cols, True), mask=mask,
                    other=0.0)
        mod_mask = mask if MOD_PER_TOKEN else (cols < dim)[None, :]
        shift = tl.load(shift_ptr + _tile_offsets(batch, tokens, shift_batch_stride, shift_token_stride, cols,
                                                  MOD_PER_TOKEN), mask=mod_mask, other=0.0)
        scale = tl.load(scale_ptr + _tile_offsets(batch, tokens, scale_batch_stride, scale_token_stride, cols,
                                                  MOD_PER_TOKEN), mask=mod_mask, other=0.0)
        out_offsets = (batch * seq + tokens)[:, None] * dim + cols[None, :]
        _norm_modulate_store(x, shift, scale, out_offsets, mask, dim, out_ptr, eps)

    @triton.jit
    def _gated_residual_norm_kernel(x_ptr, update_ptr, gate_ptr, shift_ptr, scale_ptr, x_out_ptr, out_ptr, seq, dim,
                                    x_batch_stride, x_token_stride, update_batch_stride, update_token_stride,
                                    gate_batch_stride, gate_token_stride, shift_batch_stride, shift_token_stride,
                                    scale_batch_stride, scale_token_stride, eps, MOD_PER_TOKEN: tl.constexpr,
                                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
        batch = tl.program_id(1).to(tl.int64)
        tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = (tokens < seq)[:, None] & (cols < dim)[None, :]
        x = tl.load(x_ptr + _tile_offsets(batch, tokens, x_batch_stride, x_token_stride, cols, True), mask=mask,
                    other=0.0)
        update = tl.load(update_ptr + _tile_offsets(batch, tokens, update_batch_stride, update_token_stride, cols,
                                                    True), mask=mask, other=0.0)
        mod_mask = mask if MOD_PER_TOKEN else (cols < dim)[None, :]
        gate = tl.load(gate_ptr + _tile_offsets(batch, tokens, gate_batch_stride, gate_token_stride, cols,
                                                MOD_PER_TOKEN), mask=mod_mask, other=0.0)
        shift = tl.load(shift_ptr + _tile_offsets(batch, tokens, shift_batch_stride, shift_token_stride, cols,
                                                  MOD_PER_TOKEN), mask=mod_mask, other=0.0)
        scale = tl.load(scale_ptr + _tile_offsets(batch, tokens, scale_batch_stride, scale_token_stride, cols,
                                                  MOD_PER_TOKEN), mask=mod_mask, other=0.0)
        # The residual stream is stored rounded, and normalised as stored.
        x = (x.to(tl.float32) + gate.to(tl.float32) * update.to(tl.float32)).to(x_ptr.dtype.element_ty)
        out_offsets = (batch * seq + tokens)[:, None] * dim + cols[None, :]
        tl.store(x_out_ptr + out_offsets, x, mask=mask)
        _norm_modulate_store(x, shift, scale, out_offsets, mask, dim, out_ptr, eps)

    # The same arithmetic over the row in CHUNK-column pieces, two passes: [x + gate * update, stored;] each piece's
    # mean and centred sum of squares, merged into the row's (Chan et al.'s pairwise update, as stable as centring
    # on the row's mean); then normalise and modulate, re-reading the (stored) rows, which the program has just
    # touched, from L2. A program then holds CHUNK columns per token, not the whole row padded to a power of two
    # (3072 -> 4096 for the model): a few registers per element instead of many, so several programs share an SM
    # and keep enough loads in flight at the power-limited clocks of a compiled forward, where the whole-row form
    # ran at about 2.5 TB/s.
    @triton.jit
    def _normalised_rows(x_ptr, x_out_ptr, batch, tokens, x_batch_stride, x_token_stride, out_rows, cols, mask,
                         HAS_UPDATE: tl.constexpr):
        # A chunk of the rows being normalised: the stored residual rows, or the input rows.
        if HAS_UPDATE:
            rows = tl.load(x_out_ptr + out_rows + cols[None, :], mask=mask, other=0.0)
        else:
            rows = tl.load(x_ptr + _tile_offsets(batch, tokens, x_batch_stride, x_token_stride, cols, True), mask=mask,
                           other=0.0)
        return rows

    @triton.jit
    def _chunked_norm_kernel(x_ptr, update_ptr, gate_ptr, shift_ptr, scale_ptr, x_out_ptr, out_ptr, seq, dim,
                             x_batch_stride, x_token_stride, update_batch_stride, update_token_stride,
                             gate_batch_stride, gate_token_stride, shift_batch_stride, shift_token_stride,
                             scale_batch_stride, scale_token_stride, eps, HAS_UPDATE: tl.constexpr,
                             MOD_PER_TOKEN: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        batch = tl.program_id(1).to(tl.int64)
        tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        rows_ok = (tokens < seq)[:, None]
        out_rows = (batch * seq + tokens)[:, None] * dim
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        squares = tl.zeros((ROWS,), dtype=tl.float32)  # centred on `mean`
        for start in range(0, dim, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = rows_ok & (cols < dim)[None, :]
            x = tl.load(x_ptr + _tile_offsets(batch, tokens, x_batch_stride, x_token_stride, cols, True), mask=mask,
                        other=0.0)
            if HAS_UPDATE:
                update = tl.load(update_ptr + _tile_offsets(batch, tokens, update_batch_stride, update_token_stride,
                                                            cols, True), mask=mask, other=0.0)
                mod_mask = mask if MOD_PER_TOKEN else (cols < dim)[None, :]
                gate = tl.load(gate_ptr + _tile_offsets(batch, tokens, gate_batch_stride, gate_token_stride, cols,
                                                        MOD_PER_TOKEN), mask=mod_mask, other=0.0)
                x = (x.to(tl.float32) + gate.to(tl.float32) * update.to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(x_out_ptr + out_rows + cols[None, :], x, mask=mask)
            seen = start * 1.0  # columns merged so far
            count = tl.sum((cols < dim).to(tl.float32), axis=0)
            chunk_mean = tl.sum(x.to(tl.float32), axis=1) / count
            centred = tl.where(mask, x.to(tl.float32) - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            total = seen + count
            mean += delta * (count / total)
            squares += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / total)
        inv_std = tl.rsqrt(squares / dim + eps)[:, None]
        mean = mean[:, None]
        tl.debug_barrier()  # the stored residual rows are read back below
        for start in range(0, dim, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = rows_ok & (cols < dim)[None, :]
            x = _normalised_rows(x_ptr, x_out_ptr, batch, tokens, x_batch_stride, x_token_stride, out_rows, cols, mask,
                                 HAS_UPDATE)
            mod_mask = mask if MOD_PER_TOKEN else (cols < dim)[None, :]
            shift = tl.load(shift_ptr + _tile_offsets(batch, tokens, shift_batch_stride, shift_token_stride, cols,
                                                      MOD_PER_TOKEN), mask=mod_mask, other=0.0)
            scale = tl.load(scale_ptr + _tile_offsets(batch, tokens, scale_batch_stride, scale_token_stride, cols,
                                                      MOD_PER_TOKEN), mask=mod_mask, other=0.0)
            out = (x.to(tl.float32) - mean) * inv_std * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
            tl.store(out_ptr + out_rows + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    def _strides(t: torch.Tensor) -> tuple[int, int]:
        # (batch, token) strides; a broadcast token axis (size 1) reads the same row for every token.
        return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)

    # Tokens per program, warps per program (None: 4 for the chunked form; for the whole-row form one per 512
    # columns, 8 for the model's 3072) and columns per pass of the chunked form (0: the whole-row form). Measured
    # inside a compiled 1328x1328 batch-2 forward on an H200 (bench/profile_forward.py --ada-launch, FlashAttention
    # 4): the image stream's gated residual + norm took about 134 us per call whole-row (2 tokens per program),
    # 107 us chunked in three passes (2 tokens, 1024 columns; 4 tokens: 110 us, 8 tokens of 512: 180 us), about
    # 99 us in two; all the block's norms 16.6 -> 13.3 -> 12.4 ms per forward (two passes: 1 token 14.1 ms, 8 warps
    # 20.0 ms). Alone on the card (kernels_check --sweep) the whole-row and three-pass forms timed alike.
    ADA_LAUNCH = {"ROWS": 2, "num_warps": None, "CHUNK": 1024}

    def _launch(kernel, x: torch.Tensor, *mods: torch.Tensor):
        """The kernel's grid and launch arguments for x (B, S, D) and its modulation vectors."""
        batch, seq, dim = x.shape
        rows, chunk = ADA_LAUNCH["ROWS"], ADA_LAUNCH["CHUNK"]
        config = dict(MOD_PER_TOKEN=any(t.shape[1] > 1 for t in mods), ROWS=rows)
        if chunk:
            config.update(CHUNK=min(chunk, triton.next_power_of_2(dim)), num_warps=ADA_LAUNCH["num_warps"] or 4,
                          HAS_UPDATE=kernel is _gated_residual_norm_kernel)
            kernel = _chunked_norm_kernel
        else:
            block = triton.next_power_of_2(dim)
            config.update(BLOCK=block, num_warps=ADA_LAUNCH["num_warps"] or max(1, min(16, block // 512)))
        return torch.library.wrap_triton(kernel)[(triton.cdiv(seq, rows), batch)], config

    @torch.library.triton_op("qistudio::modulated_norm", mutates_args=())
    def _modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        batch, seq, dim = x.shape
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        launch, config = _launch(_modulated_norm_kernel, x, shift, scale)
        if "CHUNK" in config:  # the chunked kernel's signature: no update, gate or residual output
            unused = x.new_empty(1)  # the residual output's place; its store is compiled out
            launch(x, x, shift, shift, scale, unused, out, seq, dim, *_strides(x), 0, 0, 0, 0, *_strides(shift),
                   *_strides(scale), eps, **config)
        else:
            launch(x, shift, scale, out, seq, dim, *_strides(x), *_strides(shift), *_strides(scale), eps, **config)
        return out

    @torch.library.triton_op("qistudio::gated_residual_norm", mutates_args=())
    def _gated_residual_norm(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, dim = x.shape
        x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        launch, config = _launch(_gated_residual_norm_kernel, x, gate, shift, scale)
        launch(x, update, gate, shift, scale, x_out, out, seq, dim, *_strides(x), *_strides(update), *_strides(gate),
               *_strides(shift), *_strides(scale), eps, **config)
        return x_out, out
