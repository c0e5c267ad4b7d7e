"""GPU benchmark: an EliGen DiT call (4 entities) against a plain call over the same tokens, batch 1 and 2.

Full-size random DiT in bf16, 1328x1328. The EliGen row has a 128-token global prompt plus 4 entity prompts of 32
tokens (256 text tokens) over overlapping regions; at batch 2 a plain row with 128 tokens beside it (guidance
batched, as the pipeline runs it). The baseline is the same call with the same text lengths and no entity mask,
so the ratio is the cost of the masking alone; a plain call with 256 tokens in every row is also shown. Eagerly
the masked rows run split attention, and also DiffSynth-Studio's form (SDPA with a dense (B, 1, S, S) boolean mask)
for comparison; with --compile, the compiled blocks' FlexAttention block mask. Rows of a batch size are timed in
interleaved rounds (bench/timing.py). Writes $OUT/eligen_{eager,compile}.md.

    python bench/eligen.py [--compile] [--batches 1 2]
    python bench/eligen.py --scale tiny --runs 1    # plumbing check on the CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pair import on_device, rel_err, scale_named  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import MIN_RUNS, card_load, interleaved  # noqa: E402
from qistudio.conditioning.sequence import build_sequence  # noqa: E402
from qistudio.models.dit import QwenImageDiT  # noqa: E402
from qistudio.models.text_encoder import TextStates  # noqa: E402
from qistudio.ops.rope import ImageGrid  # noqa: E402

ENTITIES = 4


def cases(dit, scale, batch: int, compiled: bool):
    """{row name: callable} for one batch size, and the masked row's reference output (eager split attention)."""
    h, w = scale.grid
    target = ImageGrid(0, h, w)
    base, entity = scale.text_len, scale.text_len // 4  # full size: a 128-token global prompt, 32-token entities
    full = base + entity * ENTITIES
    g = torch.Generator(scale.device).manual_seed(batch)
    tokens = torch.randn(batch, h * w, 64, device=scale.device, dtype=scale.dtype, generator=g)
    text = torch.randn(batch, full, scale.text_dim, device=scale.device, dtype=scale.dtype, generator=g)
    sigma = torch.full((batch,), 0.5, device=scale.device)
    regions = torch.zeros(ENTITIES, h, w, dtype=torch.bool, device=scale.device)
    regions[0, : h // 2, : w // 2] = regions[1, : h // 2, w // 2:] = regions[2, h // 2:, : w // 2] = True
    regions[3, h // 3:, w // 3:] = True  # overlaps the others
    lengths = [full, base][:batch]
    segments = [[entity] * ENTITIES + [base], [base]][:batch]
    eligen = build_sequence(target, [[]] * batch, TextStates(text, lengths, segments=segments), dit.config.axes_dim,
                            entity_token_masks=regions.view(ENTITIES, h * w))
    same = build_sequence(target, [[]] * batch, TextStates(text, lengths), dit.config.axes_dim)
    longest = build_sequence(target, [[]] * batch, TextStates(text, [full] * batch), dit.config.axes_dim)

    def call(seq, mask):
        def run():
            with torch.no_grad():
                return dit(tokens, seq.text.states, sigma, seq.rotary, seq.text_lengths, attention_mask=mask)
        return run

    reference = None if compiled else call(eligen, eligen.attention_mask)().float()
    rows = {f"plain, the same text lengths ({'+'.join(map(str, lengths))})": call(same, None)}
    if batch > 1:  # the earlier passes' baseline: every row as long as the EliGen row
        rows[f"plain, {full} text tokens in every row"] = call(longest, None)
    if compiled:
        rows["EliGen, FlexAttention block mask (the compiled blocks' path)"] = call(eligen, eligen.attention_mask)
    else:
        rows["EliGen, split attention (the eager path)"] = call(eligen, eligen.attention_mask)
        rows["EliGen, dense boolean mask in SDPA (DiffSynth-Studio's form)"] = call(eligen, eligen.attention_mask.dense())
    return rows, reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--runs", type=int, default=MIN_RUNS)
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager for a CPU plumbing check")
    args = parser.parse_args()
    scale = scale_named(args.scale)
    dit = on_device(lambda: QwenImageDiT(scale.our_config()), scale).eval().requires_grad_(False)
    references = {}
    if args.compile:  # the eager split attention's outputs first: the compiled masked rows are compared with them
        references = {batch: cases(dit, scale, batch, compiled=False)[1] for batch in args.batches}
        from qistudio.compile import compile_repeated_blocks

        compile_repeated_blocks(dit, backend=args.compile_backend)
    table_rows = []
    with card_load() as load:
        for batch in args.batches:
            rows, reference = cases(dit, scale, batch, args.compile)
            reference = references.get(batch, reference)
            errors = {name: rel_err(fn().float(), reference) for name, fn in rows.items() if "EliGen" in name}
            timings = interleaved(rows, runs=args.runs, warmup=2)
            base = next(iter(timings.values())).median  # the plain call over the same lengths
            for name, t in timings.items():
                table_rows.append([f"b={batch}", name, t.text(), f"{t.median / base:.2f}",
                                   f"{errors[name]:.1e}" if name in errors else ""])
    mode = "regional compile" if args.compile else "eager"
    what = (f"EliGen DiT forward, {scale.height}x{scale.width}, {str(scale.dtype).removeprefix('torch.')}, {mode}; "
            f"{ENTITIES} entities of {scale.text_len // 4} tokens plus a {scale.text_len}-token global prompt; at b=2 "
            f"a plain {scale.text_len}-token row beside it. Errors of the masked rows against the eager split attention.")
    method = f"rows of a batch size interleaved, {args.runs} rounds after 2 warm-ups; median (min-max, n)"
    table = markdown_table(["batch", "case", "forward", "x plain, same lengths", "rel. err"], table_rows)
    write_report(f"eligen_{'compile' if args.compile else 'eager'}.md",
                 caption(what, method, load.text()) + "\n\n" + table)


if __name__ == "__main__":
    main()
