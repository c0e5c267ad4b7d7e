"""GPU benchmark: one image on 2-8 GPUs. Our parallel layouts against diffusers 0.42.1's context parallelism, in
the same run, on the same random full-size weights.

What is timed is one denoising step: the DiT call(s) plus the guidance, as each library's pipeline makes them.
Ours: both guidance branches in one batched call (text rows of different lengths), split by ShardedDiT (the
code pipe.enable_parallelism runs); cfg=2 puts one branch on each half of the GPUs. diffusers: its pipeline's two
calls per step (positive, then negative; diffusers has no CFG-parallel), each split by ContextParallelConfig
(Ulysses or ring; its *_anything options where the 83 x 83 tokens of 1328x1328 do not divide). Rows:

  1328x1328 with CFG 4 (the issue's 40-step image) and 2048x2048 without CFG (vLLM-Omni's table), per layout:
  step time (median, min-max), speedup over our own one-GPU step (and diffusers' over its own), collective
  (NCCL) kernel time per block, exposed communication and GPU idle time per step from a profiled step, the
  output's error against our one-GPU output, and steps x step time for --steps steps.

Every rank builds the same weights (seeded) on its GPU; diffusers' model and ours share them by assignment. Runs
are timed round-robin across cases (bench/timing.py), with a barrier before each run so the ranks start together;
rank 0's times are reported. --fp8 adds our FP8 compute (W8A8 linears; FP8 attention where cuDNN's FP8 kernel
runs, its Ulysses all-to-alls in float8; ring layouts attend in bf16) against diffusers with torchao's FP8, after
the bf16 section. With --gpus 1 it checks instead that
one GPU under the parallel code path (degrees of 1) runs as fast as the DiT called directly.

    python bench/parallel.py --gpus 4 [--sizes 1328 2048] [--steps 40] [--fp8] [--runs 5] [--compile]
    python bench/parallel.py --gpus 1                               # degrees of 1 against the plain DiT
        (one GPU, both sizes, 5 runs: rows "ours 1 GPU", "diffusers 1 GPU" and "ours (degrees 1) 1 GPU" per size;
        the last row's "vs our 1 GPU" is the parallel code path's cost, 1.00x when it costs nothing)
    python bench/parallel.py --scale tiny --gpus 2 --runs 1         # plumbing check on the CPU (gloo; ours only)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pair import DiTCall, dit_call, our_dit, reference_dit, rel_err, scale_named  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import Timing, interleaved  # noqa: E402
from qistudio.parallel.degrees import Degrees  # noqa: E402
from qistudio.sampling.guidance import guide  # noqa: E402

CFG_SCALE = 4.0
ONE_GPU_PATH = "ours (degrees 1)"
ONE_ALL_TO_ALL = "ours, one all-to-all"  # Ulysses without the q/k/v overlap (SequenceParallelAttention.overlap)
TEXT_LENGTHS = (128, 96)  # positive and negative prompt tokens (after the template's prefix)


@dataclass(frozen=True)
class Case:
    """One row: who runs, with which split, at which size, with or without guidance."""

    side: str  # "ours", "ours (degrees 1)" (the parallel code path on one GPU), ONE_ALL_TO_ALL or "diffusers"
    degrees: Degrees  # Degrees() = one GPU
    size: int
    guidance: bool

    @property
    def name(self) -> str:
        split = self.degrees.text() if self.degrees.world_size > 1 else "1 GPU"
        size = f"{self.size}x{self.size}" if self.size else "tiny"
        return f"{self.side} {split} {size}{' cfg' if self.guidance else ''}"


def plan(gpus: int, sizes: list[int], heads: int = 24) -> list[Case]:
    """The rows for `gpus` GPUs: both one-GPU baselines, then each layout of ours and the matching diffusers ones."""
    cases = []
    for size in sizes:
        guidance = size < 2048  # the two settings: CFG at 1328, none at 2048
        cases += [Case("ours", Degrees(), size, guidance), Case("diffusers", Degrees(), size, guidance)]
        if gpus == 1:
            cases.append(Case(ONE_GPU_PATH, Degrees(), size, guidance))
            continue
        ulysses = max(d for d in range(1, gpus + 1) if gpus % d == 0 and heads % d == 0)
        ours = [Degrees(ulysses=ulysses, ring=gpus // ulysses), Degrees(ring=gpus)]
        if guidance:
            half = gpus // 2
            inner = max(d for d in range(1, half + 1) if half % d == 0 and heads % d == 0)
            ours.insert(0, Degrees(cfg=2, ulysses=inner, ring=half // inner))
        if gpus >= 4:
            ours.append(Degrees(ulysses=2, ring=gpus // 2))
        theirs = [Degrees(ulysses=ulysses, ring=gpus // ulysses), Degrees(ring=gpus)]
        cases += [Case("ours", d, size, guidance) for d in dict.fromkeys(ours)]
        cases += [Case(ONE_ALL_TO_ALL, d, size, guidance) for d in dict.fromkeys(ours) if d.ulysses > 1]
        cases += [Case("diffusers", d, size, guidance) for d in dict.fromkeys(theirs)]
    return cases


@dataclass
class Rank:
    """What one rank holds: the shared weights in both libraries' modules, and the inputs per (size, guidance)."""

    scale: object
    device: torch.device
    reference: torch.nn.Module  # diffusers' model, no parallelism
    dit: torch.nn.Module  # ours, same tensors
    calls: dict = field(default_factory=dict)
    diffusers_split: dict = field(default_factory=dict)  # Degrees -> diffusers' model with that context parallelism

    def call(self, size: int, guidance: bool) -> DiTCall:
        key = (size, guidance)
        if key not in self.calls:
            lengths = list(TEXT_LENGTHS) if guidance else [TEXT_LENGTHS[0]]
            scale = self.scale if size == 0 else _sized(self.scale, size)
            self.calls[key] = dit_call(scale, len(lengths), seed=1, text_lengths=lengths)
        return self.calls[key]


def _sized(scale, size: int):
    from dataclasses import replace

    return replace(scale, height=size, width=size)


def our_step(rank: Rank, case: Case, runtime) -> callable:
    """One denoising step of ours: the batched call through the parallel path (or the DiT directly), the guide."""
    call = rank.call(case.size, case.guidance)
    model = rank.dit if runtime is None else runtime.dit(rank.dit)
    from qistudio.ops.rope import ImageGrid, qwen_rotary

    h, w = call.grid
    rotary = qwen_rotary([ImageGrid(0, h, w)], call.text.shape[1], device=call.tokens.device,
                         axes_dim=rank.dit.config.axes_dim)

    from qistudio.parallel.attention import SequenceParallelAttention

    def step() -> torch.Tensor:
        SequenceParallelAttention.overlap = case.side != ONE_ALL_TO_ALL
        with torch.no_grad():
            out = model(call.tokens, call.text, call.sigma, rotary, call.text_lengths)
        if not case.guidance:
            return out
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, CFG_SCALE, True)

    return step


def diffusers_step(rank: Rank, case: Case) -> callable:
    """diffusers' step: its pipeline's separate positive and negative calls, each context-parallel or not."""
    model = rank.reference if case.degrees.world_size == 1 else rank.diffusers_split[case.degrees]
    call = rank.call(case.size, case.guidance)

    def step() -> torch.Tensor:
        out = call.diffusers(model)
        if not case.guidance:
            return out
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, CFG_SCALE, True)

    return step


def diffusers_parallel(rank: Rank, degrees: Degrees, tokens: int, compile_blocks: bool) -> torch.nn.Module:
    """A diffusers model on the shared weights with ContextParallelConfig for `degrees` (enable_parallelism can
    run once per model, so one model per layout)."""
    from diffusers import ContextParallelConfig, QwenImageTransformer2DModel

    from qistudio.weights.build import empty_parameters

    with empty_parameters():
        model = QwenImageTransformer2DModel(**rank.scale.dit)
    model.load_state_dict(rank.reference.state_dict(), assign=True)
    model = model.eval().requires_grad_(False)
    uneven = any(n % degrees.world_size for n in (tokens, *TEXT_LENGTHS))
    config = ContextParallelConfig(ulysses_degree=degrees.ulysses, ring_degree=degrees.ring,
                                   ulysses_anything=uneven and degrees.ring == 1,
                                   ring_anything=uneven and degrees.ulysses == 1)
    model.enable_parallelism(config=config)
    if compile_blocks:
        model.compile_repeated_blocks(fullgraph=False)  # diffusers' own regional compile, graph breaks allowed
    return model


def profile(step, device: torch.device, layers: int) -> dict[str, float]:
    """From one profiled step: collective kernel time per block, exposed collective time and idle time per step
    (ms); empty off CUDA."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    comm = [(s, t) for s, t, name in kernels if "nccl" in name.lower()]
    compute = [(s, t) for s, t, name in kernels if "nccl" not in name.lower()]
    busy = _union(comm + compute)
    wall = start.elapsed_time(end) * 1e3  # us
    return {"comm_per_block_ms": sum(t - s for s, t in comm) / layers / 1e3,
            "exposed_comm_ms": (busy - _union(compute)) / 1e3, "idle_ms": max(0.0, wall - busy) / 1e3}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, t in sorted(intervals):
        if t > end:
            total += t - max(s, end)
            end = t
    return total


def run_rank(options: dict) -> None:
    """One rank: every case in the same order on every rank (their collectives meet), rank 0 reports."""
    import torch.distributed as dist

    from qistudio.parallel.mesh import init_distributed, local_device

    scale = scale_named(options["scale"])
    device = local_device() if scale.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        from dataclasses import replace

        scale = replace(scale, device=str(device))
    init_distributed(device)
    reference = reference_dit(scale)
    rank = Rank(scale, device, reference, our_dit(reference, scale))
    if options["compile"]:
        from qistudio.compile import compile_repeated_blocks

        compile_repeated_blocks(rank.dit)
        rank.reference.compile_repeated_blocks(fullgraph=False)
    sizes = options["sizes"] if scale.name == "full" else [0]
    cases = plan(options["gpus"], sizes, rank.dit.config.num_heads)
    lines = _section(rank, cases, options, device, "bf16")
    if options["fp8"] and device.type == "cuda":
        from bench.peers import torchao_fp8
        from qistudio.memory.fp8_linear import dit_fp8_predicate, quantize_linears, set_fp8_compute
        from qistudio.ops.attention import set_fp8_attention

        quantize_linears(rank.dit, dit_fp8_predicate)
        set_fp8_compute(rank.dit, True, True)
        set_fp8_attention(rank.dit, True)
        fp8_note = torchao_fp8(rank.reference)
        rank.diffusers_split.clear()
        lines += _section(rank, cases, options, device, f"FP8 (ours W8A8; diffusers: {fp8_note})")
    if dist.get_rank() == 0:
        write_report("parallel.md", "\n\n".join(lines))


def _section(rank: Rank, cases: list[Case], options: dict, device, label: str) -> list[str]:
    import torch.distributed as dist

    from qistudio.parallel.runtime import enable_parallelism

    main = dist.get_rank() == 0
    world = dist.get_world_size()
    steps, skipped = {}, []
    for case in cases:
        if case.side == "diffusers" and case.degrees.world_size > 1 and device.type != "cuda":
            skipped.append(f"{case.name}: diffusers' context parallelism needs an accelerator")
            continue
        if case.side == ONE_GPU_PATH:
            steps[case] = our_step(rank, case, enable_parallelism(device, rank.dit.config.num_heads, Degrees()))
            continue
        if case.degrees.world_size == 1:  # one GPU: rank 0 runs, the others wait
            fn = (our_step(rank, case, None) if case.side == "ours" else diffusers_step(rank, case)) if main else None
            steps[case] = fn or (lambda: None)
            continue
        if case.side in ("ours", ONE_ALL_TO_ALL):
            steps[case] = our_step(rank, case, enable_parallelism(device, rank.dit.config.num_heads,
                                                                   case.degrees))
        else:
            if case.degrees not in rank.diffusers_split:
                call = rank.call(case.size, case.guidance)
                try:
                    rank.diffusers_split[case.degrees] = diffusers_parallel(rank, case.degrees, call.tokens.shape[1],
                                                                            options["compile"])
                except (ValueError, RuntimeError, NotImplementedError) as e:
                    skipped.append(f"{case.name}: {' '.join(str(e).split())[:160]}")
                    continue
            steps[case] = diffusers_step(rank, case)
    outputs = {case: fn() for case, fn in steps.items()}  # the warm-up run, kept to compare
    timings: dict[Case, Timing] = {}
    by_name = {case.name: case for case in steps}
    results = interleaved({case.name: fn for case, fn in steps.items()}, runs=options["runs"],
                          before=lambda name: dist.barrier(), device=device, wall=device.type != "cuda")
    timings = {by_name[name]: timing for name, timing in results.items()}
    profiles = {case: profile(fn, device, rank.dit.config.num_layers) for case, fn in steps.items()
                if case.degrees.world_size > 1 or main}
    if not main:
        return []
    rows = []
    for case in steps:
        side = "ours" if case.side in (ONE_GPU_PATH, ONE_ALL_TO_ALL) else case.side
        baseline = next(c for c in steps if c.side == side and c.size == case.size and c.degrees.world_size == 1)
        ours_one = next(c for c in steps if c.side == "ours" and c.size == case.size and c.degrees.world_size == 1)
        timing, info = timings[case], profiles.get(case, {})
        rows.append([case.name, timing.text(), f"{timings[ours_one].median / timing.median:.2f}x",
                     f"{timings[baseline].median / timing.median:.2f}x",
                     _ms(info.get("comm_per_block_ms")), _ms(info.get("exposed_comm_ms")), _ms(info.get("idle_ms")),
                     f"{rel_err(outputs[case].float(), outputs[ours_one].float()):.1e}",
                     f"{timing.median * options['steps']:.2f} s"])
    header = ["case", "step", "vs our 1 GPU", "vs own 1 GPU", "collective ms/block", "exposed comm ms/step",
              "idle ms/step", "error vs our 1 GPU", f"{options['steps']} steps"]
    what = (f"One denoising step on {world} GPU(s), {label}, {rank.scale.name} scale; CFG rows: both branches "
            f"(text {TEXT_LENGTHS[0]} and {TEXT_LENGTHS[1]} tokens), guidance scale {CFG_SCALE} with norm rescale.")
    method = (f"bench/timing.py interleaved, {options['runs']} runs, barrier before each; rank 0's times; "
              + ("both sides' blocks compiled (regional torch.compile)" if options["compile"] else "eager"))
    text = caption(what, method)
    text += "\n\n" + markdown_table(header, rows)
    if skipped:
        text += "\n\nNot run: " + "; ".join(skipped)
    return [text]


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="ranks (default: every visible GPU; 2 on the CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1328, 2048])
    parser.add_argument("--steps", type=int, default=40, help="steps of the end-to-end estimate")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="regional torch.compile of both sides' blocks (ours fullgraph, diffusers' with breaks)")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    options = vars(parser.parse_args())
    from qistudio.parallel.launch import launch, visible_gpus

    if options["gpus"] is None:
        options["gpus"] = visible_gpus() if options["scale"] == "full" else 2
    launch(run_rank, (options,), options["gpus"])


if __name__ == "__main__":
    main()
