"""GPU benchmark: the full-size DiT under VRAM budgets (block streaming, FP8 storage) against resident and against
diffusers' group offload with CUDA streams, in one process on one card.

Random weights (real config, 20.4B parameters, bf16) are built on the GPU by our class. Each case applies a
memory plan to the same model, times the forward (bench/timing.py: CUDA events, median and min-max of 5 after
warm-ups: with streaming the prefetch cycle then runs as it does between steps) and records the peak device memory
of the forward. The cases cannot be interleaved (each is a plan applied to the one model), so they run in turn. The
transfer floor of a streamed case is its streamed bytes over the host-to-device bandwidth measured here.

    python bench/offload.py [--batches 2 1] [--budgets 24 4] [--fp8] [--diffusers]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import TEXT_LEN  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import MIN_RUNS, card_load, measure  # noqa: E402
from qistudio.memory.manager import MemoryManager, model_size  # noqa: E402
from qistudio.memory.plan import GiB, plan_memory  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402

SIZE = 1328


def h2d_bandwidth() -> float:
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    return GiB / measure(lambda: device.copy_(host, non_blocking=True), warmup=2).median


def inputs(batch: int):
    """The same inputs for every case of a batch size, so outputs compare."""
    h = w = SIZE // 16
    g = torch.Generator("cuda").manual_seed(batch)
    tokens = torch.randn(batch, h * w, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(batch, TEXT_LEN, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    sigma = torch.full((batch,), 0.5, device="cuda")
    return tokens, text, sigma, qwen_rotary([ImageGrid(0, h, w)], TEXT_LEN, device="cuda")


def time_forward(dit, batch: int):
    tokens, text, sigma, rotary = inputs(batch)

    def run():
        with torch.no_grad():
            return dit(tokens, text, sigma, rotary)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = measure(run, warmup=2)
    peak = torch.cuda.max_memory_allocated() / GiB
    return t, peak, run().float()


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--budgets", type=float, nargs="+", default=[24, 4])
    parser.add_argument("--fp8", action="store_true", help="also FP8 storage at the smallest budget")
    parser.add_argument("--diffusers", action="store_true", help="also diffusers' block-level group offload")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 budget cases")
    args = parser.parse_args()

    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        dit = QwenImageDiT(DiTConfig()).to(torch.bfloat16).eval().requires_grad_(False)
    print(f"built DiT in {time.time() - t0:.0f}s", flush=True)
    with card_load() as load:
        bandwidth = h2d_bandwidth()
        rows, reference = [], {}
        for batch in args.batches:
            t, peak, out = time_forward(dit, batch)
            reference[batch] = (t, out)
            rows.append((f"b={batch}", "qistudio resident (bf16)", t, peak, "", 0.0))
            print(rows[-1], flush=True)

        def managed_case(label: str, budget: float) -> None:
            # Plans are made for the DiT phase alone: the budget is what the denoising phase may use.
            plan = plan_memory(int(budget * GiB), {"dit": model_size("dit", dit)})
            manager = MemoryManager({"dit": dit}, "cuda", plan)
            streamed = sum(s.streamed_bytes for s in manager.streamers.get("dit", []))
            with manager.phase("denoising", "dit"):
                for batch in args.batches:
                    t, peak, out = time_forward(dit, batch)
                    note = f"{plan.describe()}; streamed {streamed / GiB:.1f} GiB/forward, floor {streamed / bandwidth:.3f} s"
                    rows.append((f"b={batch}", f"qistudio {label} budget {budget:g} GiB", t, peak, note,
                                 rel(out, reference[batch][1])))
                    print(rows[-1], flush=True)
            # Back to resident for the next case: whole model on the device, host copies dropped with the manager.
            for streamer in manager.streamers.get("dit", []):
                streamer.detach()
            for offload in manager.offloads.values():
                offload.onload()
            dit.to("cuda")

        def managed_cases(label: str, budgets) -> None:
            for budget in budgets:
                managed_case(label, budget)
                gc.collect()
                torch.cuda.empty_cache()
                torch._C._host_emptyCache()

        if not args.no_bf16:
            managed_cases("bf16", args.budgets)
        if args.fp8:
            from qistudio.memory.fp8_linear import dit_fp8_predicate, quantize_linears

            quantize_linears(dit, dit_fp8_predicate)
            torch.cuda.empty_cache()
            managed_cases("FP8 storage", [min(args.budgets)])
        del dit
        gc.collect()
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()  # the pinned blocks our cases freed stay cached otherwise: diffusers needs the RAM

        if args.diffusers:
            import diffusers
            from diffusers import QwenImageTransformer2DModel

            torch.set_default_dtype(torch.bfloat16)
            with torch.device("cuda"):
                ref = QwenImageTransformer2DModel(num_layers=60).eval().requires_grad_(False)
            torch.set_default_dtype(torch.float32)
            # Its fastest documented form: one block per group, prefetched on a side stream, non-blocking copies
            # whose memory is kept alive by record_stream rather than a synchronisation.
            ref.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                     non_blocking=True, record_stream=True)
            torch.cuda.empty_cache()
            h = w = SIZE // 16
            for batch in args.batches:
                tokens, text, sigma, _ = inputs(batch)

                def run_ref():
                    with torch.no_grad():
                        return ref(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma,
                                   img_shapes=[[(1, h, w)]] * batch, return_dict=False)[0]

                torch.cuda.reset_peak_memory_stats()
                t = measure(run_ref, warmup=2)
                rows.append((f"b={batch}", f"diffusers {diffusers.__version__} group offload (block, stream, record_stream)", t,
                             torch.cuda.max_memory_allocated() / GiB, "", None))
                print(rows[-1], flush=True)

    what = (f"The DiT at {SIZE}x{SIZE}, text {TEXT_LEN} tokens, bf16 compute, under VRAM budgets; host-to-device "
            f"(pinned) {bandwidth / 1e9:.1f} GB/s measured in the same run.")
    method = f"each case in turn, {MIN_RUNS} forwards after 2 warm-ups, CUDA events; median (min-max, n)"
    table_rows = []
    for case, name, t, peak, note, err in rows:
        base = reference[int(case.split("=")[1])][0]
        table_rows.append([case, name, t.text(), f"{t.median / base.median:.2f}", f"{peak:.1f}", note,
                           "" if err is None else f"{err:.1e}"])
    table = markdown_table(["batch", "case", "forward", "x resident", "peak GiB", "plan / transfer floor",
                            "rel. err vs resident"], table_rows)
    write_report("offload.md", caption(what, method, load.text()) + "\n\n" + table)


if __name__ == "__main__":
    main()
