"""GPU benchmark: an EliGen DiT call (4 entities) against a plain call over the same tokens, batch 1 and 2.

Full-size random DiT in bf16, 1328x1328. The EliGen row has a 128-token global prompt plus 4 entity prompts of 32
tokens (256 text tokens) over overlapping regions; at batch 2 a plain row with 128 tokens beside it (guidance
batched, as the pipeline runs it). The baseline is the same call with the same text lengths and no entity mask,
so the ratio is the cost of the masking alone; a plain call with 256 tokens in every row is also shown. Eagerly
the masked rows run split attention, and also DiffSynth-Studio's form (SDPA with a dense (B, 1, S, S) boolean mask)
for comparison; with --compile, the compiled blocks' FlexAttention block mask. Rows of a batch size are timed in
interleaved rounds (bench/timing.py). Writes $OUT/eligen_{eager,compile}.md.

    python bench/eligen.py [--compile] [--batches 1 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pair import rel_err  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import MIN_RUNS, card_load, interleaved  # noqa: E402
from qistudio.conditioning.sequence import build_sequence  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.models.text_encoder import TextStates  # noqa: E402
from qistudio.ops.rope import ImageGrid  # noqa: E402

GLOBAL, ENTITY, ENTITIES = 128, 32, 4


def cases(dit, batch: int, compiled: bool):
    """{row name: callable} for one batch size, and the masked row's reference output (eager split attention)."""
    h = w = 1328 // 16
    target = ImageGrid(0, h, w)
    full = GLOBAL + ENTITY * ENTITIES
    g = torch.Generator("cuda").manual_seed(batch)
    tokens = torch.randn(batch, h * w, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(batch, full, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    sigma = torch.full((batch,), 0.5, device="cuda")
    regions = torch.zeros(ENTITIES, h, w, dtype=torch.bool, device="cuda")
    regions[0, : h // 2, : w // 2] = regions[1, : h // 2, w // 2:] = regions[2, h // 2:, : w // 2] = True
    regions[3, h // 3:, w // 3:] = True  # overlaps the others
    lengths = [full, GLOBAL][:batch]
    segments = [[ENTITY] * ENTITIES + [GLOBAL], [GLOBAL]][:batch]
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
    rows = {f"plain, the same text lengths ({'+'.join(map(str, lengths))})": call(same, None),
            f"plain, {full} text tokens in every row": call(longest, None)}
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
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        dit = QwenImageDiT(DiTConfig()).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    references = {}
    if args.compile:  # the eager split attention's outputs first: the compiled masked rows are compared with them
        references = {batch: cases(dit, batch, compiled=False)[1] for batch in args.batches}
        from qistudio.compile import compile_repeated_blocks

        compile_repeated_blocks(dit)
    table_rows = []
    with card_load() as load:
        for batch in args.batches:
            rows, reference = cases(dit, batch, args.compile)
            reference = references.get(batch, reference)
            errors = {name: rel_err(fn().float(), reference) for name, fn in rows.items() if "EliGen" in name}
            timings = interleaved(rows, runs=MIN_RUNS, warmup=2)
            base = next(iter(timings.values())).median  # the plain call over the same lengths
            for name, t in timings.items():
                table_rows.append([f"b={batch}", name, t.text(), f"{t.median / base:.2f}",
                                   f"{errors[name]:.1e}" if name in errors else ""])
    mode = "regional compile" if args.compile else "eager"
    what = (f"EliGen DiT forward, 1328x1328, bf16, {mode}; {ENTITIES} entities of {ENTITY} tokens plus a {GLOBAL}-token "
            f"global prompt; at b=2 a plain {GLOBAL}-token row beside it. Errors of the masked rows against the eager "
            "split attention.")
    method = f"rows of a batch size interleaved, {MIN_RUNS} rounds after 2 warm-ups, CUDA events; median (min-max, n)"
    table = markdown_table(["batch", "case", "forward", "x plain, same lengths", "rel. err"], table_rows)
    write_report(f"eligen_{'compile' if args.compile else 'eager'}.md",
                 caption(what, method, load.text()) + "\n\n" + table)


if __name__ == "__main__":
    main()
