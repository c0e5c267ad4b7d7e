"""GPU benchmark: an EliGen DiT call (4 entities) against a plain call with the same number of tokens.

Full-size random DiT in bf16, 1328x1328, batch 2 (guidance batched: row 0 with entities, row 1 plain), 128 global
text tokens plus 4 entity prompts of 32 tokens; the plain call has 256 text tokens per row. Also the dense-mask
path (SDPA with a (B, 1, S, S) boolean mask) for comparison; with --compile, the compiled blocks' FlexAttention
block mask against the eager split attention. Writes $OUT/eligen_{eager,compile}.md.

    python bench/eligen.py [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import cuda_time  # noqa: E402
from qistudio.conditioning.sequence import build_sequence  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.models.text_encoder import TextStates  # noqa: E402
from qistudio.ops.rope import ImageGrid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        dit = QwenImageDiT(DiTConfig()).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    h = w = 1328 // 16
    target = ImageGrid(0, h, w)
    tokens = torch.randn(2, h * w, 64, device="cuda", dtype=torch.bfloat16)
    sigma = torch.full((2,), 0.5, device="cuda")
    text = torch.randn(2, 256, 3584, device="cuda", dtype=torch.bfloat16)
    regions = torch.zeros(4, h * w, dtype=torch.bool, device="cuda")
    grid = regions.view(4, h, w)
    grid[0, : h // 2, : w // 2] = grid[1, : h // 2, w // 2 :] = grid[2, h // 2 :, : w // 2] = True
    grid[3, h // 3 :, w // 3 :] = True  # overlaps the others
    plain = build_sequence(target, [[], []], TextStates(text, [256, 256]), dit.config.axes_dim)
    eligen = build_sequence(target, [[], []], TextStates(text, [256, 128], segments=[[32] * 4 + [128], [128]]),
                            dit.config.axes_dim, entity_token_masks=regions)
    dense_mask = eligen.attention_mask.dense()

    def call(seq, mask):
        def run():
            with torch.no_grad():
                return dit(tokens, seq.text.states, sigma, seq.rotary, seq.text_lengths, attention_mask=mask)
        return run

    out_split = call(eligen, eligen.attention_mask)().float()  # eager split attention: the reference below
    if args.compile:
        from qistudio.compile import compile_repeated_blocks

        compile_repeated_blocks(dit)
    rows = []
    t_plain = cuda_time(call(plain, None))
    rows.append(("plain, 256 text tokens per row", t_plain))
    t_masked = cuda_time(call(eligen, eligen.attention_mask))
    rows.append(("EliGen, 4 entities, " + ("FlexAttention block mask (the compiled blocks' path)" if args.compile
                                          else "split attention (the eager path)"), t_masked))
    if args.compile:
        out_flex = call(eligen, eligen.attention_mask)().float()
        err = ((out_flex - out_split).norm() / out_split.norm()).item()
    else:
        t_dense = cuda_time(call(eligen, dense_mask))
        rows.append(("EliGen, 4 entities, dense boolean mask in SDPA", t_dense))
        out_dense = call(eligen, dense_mask)().float()
        err = ((out_split - out_dense).norm() / out_dense.norm()).item()
    mode = "regional compile" if args.compile else "eager"
    lines = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"full DiT forward, 1328x1328, batch 2, bf16, {mode}; rel. err of the masked row against "
             f"{'eager split attention' if args.compile else 'the dense mask'} {err:.1e}", "",
             "| case | forward | x plain |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} s | {t / t_plain:.2f} |" for name, t in rows]
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"eligen_{'compile' if args.compile else 'eager'}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
