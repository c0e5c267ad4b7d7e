"""GPU benchmark: the Qwen-Image DiT forward, qistudio against diffusers at its best, one process, one card.

Random full-size weights (real config, 20.4B parameters, bf16), built once by diffusers' class and shared by
assignment with our module, so both run identical weights with one copy in memory. Three sections, each a table
whose rows name the attention kernel they run, so that rows running the same kernel on both sides can be read
side by side (the "same kernel" column):

  eager     diffusers with every attention backend its dispatcher can run here (native SDPA, SDPA forced to
            cuDNN / flash / mem-efficient, sage and _flash_3 where installed, FlashAttention 4 from the same
            flash-attn-4 wheel we use), and ours with each of ours. Ranks the kernels.
  compiled  both under regional torch.compile (diffusers' `compile_repeated_blocks`, static shapes as ours), for
            each attention pair in --pairs (diffusers backend:our backend; default the cuDNN pair and the
            FlashAttention 4 pair): diffusers' best configuration against ours, and the same kernels side by side.
  fp8       diffusers' FP8 route (torchao float8 dynamic activation + weight, per-row scales, compiled) against our
            FP8 compute (W8A8, compiled) with the same attention kernels, and ours with cuDNN's FP8 attention.
            Quantises both models in place, so it runs last.

Timing (bench/timing.py): per case, every row's warm-up first (compilation included, untimed), then --runs
rounds in which each row is timed once, in turn (CUDA events); median and min-max. Errors: relative L2 against
diffusers' eager bf16 output (native SDPA). Writes $OUT/dit_forward.md after every case (a run cut short keeps
what it finished; --report names the file).

    python bench/dit_forward.py [--sections eager compiled fp8] [--batches 1 2] [--eager-batches 1] [--runs 5]
    python bench/dit_forward.py --scale tiny --compile-backend aot_eager --runs 1   # plumbing check on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fast_paths import FUSED_SWITCHES, reset  # noqa: E402
from bench.pair import dit_call, dit_flops, our_dit, reference_dit, rel_err, scale_named  # noqa: E402
from bench.peers import (DIFFUSERS_KERNEL, KERNELS, OURS_KERNEL, diffusers_backend_problem,  # noqa: E402
                         diffusers_backends, ours_backends, set_diffusers_backend, torchao_fp8)
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved, measure  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.ops.attention import available_backends, set_attention_backend, set_fp8_attention  # noqa: E402

TEXT_LEN = 128


@dataclass
class Variant:
    """One row: who runs (diffusers or qistudio), with which attention kernel, set up how, called how."""

    side: str
    label: str
    kernel: str
    setup: Callable[[], None]
    run: Callable[[], torch.Tensor]


@dataclass
class Row:
    case: str
    variant: Variant
    timing: object  # bench.timing.Timing
    error: float
    flops: float


def matmul_ceiling(device) -> float:
    """TFLOP/s of an 8192^3 bf16 GEMM on this card now (the table's '% of ceiling')."""
    if torch.device(device).type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / measure(lambda: a @ b, runs=5, warmup=3, calls=10).median / 1e12


def time_rows(case: str, variants: list[Variant], expected: torch.Tensor, flops: float, args) -> list[Row]:
    """Warm up each variant (its first call compiles) and take its error, then time all in interleaved rounds."""
    errors = {}
    for v in variants:
        started = time.time()
        try:
            v.setup()
            errors[v.label] = rel_err(v.run().float(), expected)
        except Exception as e:  # an optional kernel failing is a note, not the end of the run
            print(f"  {case} {v.label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
            continue
        print(f"  {case} {v.label}: first call {time.time() - started:.1f} s, rel. err {errors[v.label]:.2e}",
              flush=True)
    runnable = [v for v in variants if v.label in errors]
    setups = {v.label: v.setup for v in runnable}
    timings = interleaved({v.label: v.run for v in runnable}, runs=args.runs, warmup=args.warmup,
                          before=lambda label: setups[label]())
    rows = [Row(case, v, timings[v.label], errors[v.label], flops) for v in runnable]
    for row in rows:
        print(f"  {case} {row.variant.label}: {row.timing.text()}", flush=True)
    return rows


def table(rows: list[Row], ceiling: float, bf16_best: dict[str, float] | None = None) -> str:
    """Each row against diffusers' fastest row of its case and against diffusers' row with the same kernel."""
    best, same = {}, {}
    for r in rows:
        if r.variant.side == "diffusers":
            best[r.case] = min(best.get(r.case, float("inf")), r.timing.median)
            same[(r.case, r.variant.kernel)] = r.timing.median
    header = ["case", "implementation", "attention kernel", "forward: median (min-max, n)", "x diffusers' best",
              "x diffusers, same kernel", "TFLOP/s", "% of ceiling", "rel. err vs diffusers eager"]
    if bf16_best:
        header.insert(6, "x diffusers' best bf16")
    lines = []
    for r in rows:
        t = r.timing.median
        same_kernel = same.get((r.case, r.variant.kernel))
        tflops = r.flops / t / 1e12
        cells = [r.case, r.variant.label, KERNELS[r.variant.kernel], r.timing.text(),
                 f"{best[r.case] / t:.3f}" if r.case in best else "",
                 f"{same_kernel / t:.3f}" if same_kernel and r.variant.side == "qistudio" else "",
                 f"{tflops:.0f}", f"{100 * tflops / ceiling:.0f}%" if ceiling == ceiling else "", f"{r.error:.2e}"]
        if bf16_best:
            cells.insert(6, f"{bf16_best[r.case] / t:.3f}" if r.case in bf16_best else "")
        lines.append(cells)
    return markdown_table(header, lines)


class Bench:
    def __init__(self, args):
        self.args = args
        self.scale = scale_named(args.scale)
        self.ref = reference_dit(self.scale)
        self.ours = our_dit(self.ref, self.scale)
        self.sections: list[str] = []
        self.skipped: list[str] = []
        self.load = None  # bench.timing.CardLoad, filled when the timed sections end
        self.calls, self.expected = {}, {}
        for batch in sorted(set(args.batches) | set(args.eager_batches)):
            call = dit_call(self.scale, batch, seed=10 + batch, text_len=args.text_len)
            self.calls[batch] = call
            set_diffusers_backend(self.ref, "native")
            self.expected[batch] = call.diffusers(self.ref).float()
        cfg = self.ours.config
        h, w = self.scale.grid
        self.flops = {b: dit_flops(h * w, args.text_len, b, cfg.num_layers, cfg.dim, cfg.mlp_hidden)
                      for b in self.calls}
        self.ceiling = matmul_ceiling(self.scale.device)

    def case(self, batch: int) -> str:
        return f"{self.scale.height}² b={batch}"

    def diffusers_variant(self, batch: int, backend: str, mode: str) -> Variant:
        call = self.calls[batch]
        return Variant("diffusers", f"diffusers {mode}", DIFFUSERS_KERNEL[backend],
                       lambda: set_diffusers_backend(self.ref, backend), lambda: call.diffusers(self.ref))

    def ours_variant(self, batch: int, backend: str, mode: str, fp8: bool = False, without: str | None = None):
        call = self.calls[batch]
        fp8_attention = backend == "cudnn_fp8"

        def setup():
            reset()
            set_attention_backend(None if fp8_attention else backend)
            if fp8:
                set_fp8_attention(self.ours, fp8_attention)
            if without:
                FUSED_SWITCHES[without](False)

        label = f"qistudio {mode}" + (f", without fused {without}" if without else "")
        return Variant("qistudio", label, OURS_KERNEL[backend], setup, lambda: call.ours(self.ours))

    def write(self, final: bool = False) -> None:
        args = self.args
        what = (f"DiT forward, {self.scale.name} scale ({self.scale.height}x{self.scale.width}, text {args.text_len} "
                f"tokens, {self.ours.config.num_layers} blocks, random weights shared by both libraries); bf16 "
                f"matmul ceiling measured {self.ceiling:.0f} TFLOP/s (8192^3 GEMM, idle card); peak memory "
                f"{torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f} GiB."
                + ("" if final else " (Incomplete: the run is still going or was cut short.)"))
        method = (f"per case, each row warmed up ({args.warmup} untimed runs after the first call, which compiles), "
                  f"then {args.runs} rounds timing every row once in turn "
                  f"({'CUDA events' if self.scale.device == 'cuda' else 'host clock'}); median (min-max, n)")
        notes = [f"Not run: {s}." for s in self.skipped]
        text = caption(what, method, self.load.text() if final and self.load else None)
        text += "\n\n" + "\n\n".join(self.sections) + ("\n\n" + "\n".join(notes) if notes else "")
        write_report(self.args.report, text, echo=final)

    # --- sections -------------------------------------------------------------------------------------------------

    def eager(self) -> None:
        diffusers, skipped = diffusers_backends(eager=True)
        self.skipped += [f"diffusers eager {name} ({why})" for name, why in skipped.items()]
        rows = []
        for batch in self.args.eager_batches:
            variants = [self.diffusers_variant(batch, name, f"eager, {name} backend") for name in diffusers]
            variants += [self.ours_variant(batch, name, f"eager, {name} backend") for name in ours_backends()]
            rows += time_rows(self.case(batch), variants, self.expected[batch], self.flops[batch], self.args)
            self.sections.append("### Eager, every attention backend\n\n" + table(rows, self.ceiling))
            self.write()
            self.sections.pop()
        self.sections.append("### Eager, every attention backend\n\n" + table(rows, self.ceiling))

    def pairs(self, wanted: list[str]) -> list[tuple[str, str]]:
        pairs = []
        for pair in wanted:
            theirs, _, ours = pair.partition(":")
            problem = diffusers_backend_problem(theirs)
            if problem or ours not in available_backends():
                self.skipped.append(f"pair {pair} ({problem or f'our {ours} backend cannot run here'})")
            else:
                pairs.append((theirs, ours))
        return pairs

    def compiled_bf16(self) -> dict[str, float]:
        args = self.args
        mode = "regional compile" + (f" ({args.compile_mode})" if args.compile_mode else "")
        # diffusers' own regional compile, static shapes (each batch size its own graph, as ours: a graph generic
        # in the batch ran slower, bench/RESULTS.md sixth pass).
        self.ref.compile_repeated_blocks(fullgraph=True, dynamic=False, mode=args.compile_mode,
                                         backend=args.compile_backend)
        compile_repeated_blocks(self.ours, mode=args.compile_mode, backend=args.compile_backend)
        pairs = self.pairs(args.pairs)
        rows, title = [], f"### Regional compile, bf16 ({mode})"
        for batch in args.batches:
            variants = [self.diffusers_variant(batch, theirs, f"{mode}, {theirs} backend") for theirs, _ in pairs]
            variants += [self.ours_variant(batch, ours, f"{mode}, {ours} backend") for _, ours in pairs]
            last = pairs[-1][1] if pairs else "sdpa"
            variants += [self.ours_variant(batch, last, f"{mode}, {last} backend", without=op) for op in args.without]
            rows += time_rows(self.case(batch), variants, self.expected[batch], self.flops[batch], args)
            self.sections.append(f"{title}\n\n" + table(rows, self.ceiling))
            self.write()
            self.sections.pop()
        self.sections.append(f"{title}\n\n" + table(rows, self.ceiling))
        best = {}
        for r in rows:
            if r.variant.side == "diffusers":
                best[r.case] = min(best.get(r.case, float("inf")), r.timing.median)
        return best

    def fp8(self, bf16_best: dict[str, float]) -> None:
        from qistudio.memory.fp8_linear import quantize_linears, set_fp8_compute

        args = self.args
        if self.scale.device != "cuda":
            self.skipped.append("FP8 section (torch._scaled_mm needs CUDA)")
            return
        if "compiled" not in args.sections:
            self.ref.compile_repeated_blocks(fullgraph=True, dynamic=False, mode=args.compile_mode,
                                             backend=args.compile_backend)
            compile_repeated_blocks(self.ours, mode=args.compile_mode, backend=args.compile_backend)
        quantize_linears(self.ours)  # ours drops its references to the shared bf16 block weights...
        set_fp8_compute(self.ours, True)
        described = torchao_fp8(self.ref, args.torchao_scope)  # ...and these replace diffusers' (freed)
        torch.cuda.empty_cache()
        pairs = self.pairs(args.fp8_pairs)
        mode = "regional compile"
        rows, title = [], f"### FP8, regional compile: diffusers + {described} against qistudio W8A8"
        for batch in args.batches:
            variants = [self.diffusers_variant(batch, theirs, f"+ torchao FP8, {mode}, {theirs} backend")
                        for theirs, _ in pairs]
            variants += [self.ours_variant(batch, ours, f"FP8 W8A8, {mode}, {ours} backend", fp8=True)
                         for _, ours in pairs]
            if "cudnn_fp8" in available_backends():
                variants.append(self.ours_variant(batch, "cudnn_fp8", f"FP8 W8A8 + FP8 attention, {mode}", fp8=True))
            rows += time_rows(self.case(batch), variants, self.expected[batch], self.flops[batch], args)
            self.sections.append(f"{title}\n\n" + table(rows, self.ceiling, bf16_best))
            self.write()
            self.sections.pop()
        self.sections.append(f"{title}\n\n" + table(rows, self.ceiling, bf16_best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--sections", nargs="+", default=["eager", "compiled", "fp8"],
                        choices=["eager", "compiled", "fp8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="compiled and FP8 sections")
    parser.add_argument("--eager-batches", type=int, nargs="*", default=[1, 2], help="eager section")
    parser.add_argument("--text-len", type=int, default=TEXT_LEN)
    parser.add_argument("--pairs", nargs="+", default=["native:sdpa", "flash4:flash4"],
                        help="compiled bf16 rows as DIFFUSERS_BACKEND:OUR_BACKEND, each side timed")
    parser.add_argument("--fp8-pairs", nargs="+", default=["flash4:flash4"],
                        help="FP8 rows as DIFFUSERS_BACKEND:OUR_BACKEND (ours also with cuDNN FP8 attention)")
    parser.add_argument("--torchao-scope", default="blocks", choices=["blocks", "all"],
                        help="which of diffusers' linears torchao quantises (blocks: the ones our FP8 covers)")
    parser.add_argument("--without", nargs="*", default=[], choices=sorted(FUSED_SWITCHES),
                        help="compiled section: also ours (last pair's backend) with each fused op off")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for both, e.g. "
                        "max-autotune-no-cudagraphs")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager for a CPU plumbing check")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (median and min-max of these)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each row after its first call")
    parser.add_argument("--report", default="dit_forward.md", help="file name of the report under $OUT")
    args = parser.parse_args()
    for value in args.pairs + args.fp8_pairs:
        if value.count(":") != 1:
            parser.error(f"a pair is DIFFUSERS_BACKEND:OUR_BACKEND (e.g. flash4:flash4), got {value!r}")
    torch._dynamo.config.recompile_limit = 64  # each (batch, backend, precision) is a graph of its own
    torch._dynamo.config.cache_size_limit = 64

    started = time.time()
    bench = Bench(args)
    print(f"built both DiTs and the eager references in {time.time() - started:.0f} s", flush=True)
    with card_load() as bench.load:
        if "eager" in args.sections:
            bench.eager()
        bf16_best = bench.compiled_bf16() if "compiled" in args.sections else {}
        if "fp8" in args.sections:
            bench.fp8(bf16_best)
    bench.write(final=True)


if __name__ == "__main__":
    main()
