"""GPU benchmark: step caching. Whole images (text encoding, N steps with guidance, no decode) through qistudio's
pipeline and diffusers' QwenImagePipeline on the same full-size random weights, each method at the same setting on
both sides: First-Block Cache and TaylorSeer (lite) against diffusers' hooks, DBCache (+ TaylorSeer calibrator) and
the fixed schedule against cache-dit on the diffusers pipeline.

Random weights say nothing of quality, so each row reads time against the cache's own skip count: the steps each
side computed per guidance branch (ours from `pipe.last_cache_report`, the reference's by watching a middle block
run), the image time of each side and of our uncached pipeline timed in the same interleaved rounds, and how far
our final latents are from the reference's (bfloat16: a threshold decision may flip on a 1e-3 difference, and the
steps lists then say so). The thresholds default to values that skip on random weights; set them with
--threshold / --db-threshold. Both sides run eager (diffusers' and cache-dit's hooks are eager code); with
--compile our pipeline runs compiled (`pipe.compile()`) in every row.

The per-step overhead of deciding (issue 28: < 1% of a step) is timed on one batched DiT call: plain, and through a
First-Block Cache / DBCache (8 front blocks) gate whose threshold makes it measure the residual change and store the
residual on every call while never skipping.

    python bench/step_cache.py [--steps 40] [--size 1328] [--runs 3] [--methods first-block,taylorseer]
    python bench/step_cache.py --scale tiny --size 64 --steps 6 --runs 1   # plumbing check on the CPU
A full run of every method takes longer than one 10-minute device command: give --methods a few at a time.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pair import dit_call, our_dit, pipeline_pair, reference_dit, rel_err, released_text_encoder_config, scale_named  # noqa: E402,E501
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved  # noqa: E402
from qistudio.caching import DBCache, FirstBlockCache, FixedSchedule, TaylorSeer, setting_text, start_cache  # noqa: E402
from qistudio.ops.packing import patchify  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402

PROMPT = "A watercolour fox in a snowy birch forest at dawn, soft light, fine detail"
NEGATIVE = "blurry, low quality"
METHODS = ("first-block", "taylorseer", "dbcache", "fixed")


def settings(name: str, args, steps: int, layers: int):
    """(our setting, a function that enables the same on the reference pipeline and returns its undo)."""
    if name == "first-block":
        from diffusers.hooks import FirstBlockCacheConfig

        def enable(ref):
            ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=args.threshold))
            return ref.transformer.disable_cache

        return FirstBlockCache(threshold=args.threshold), enable
    if name == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig

        def enable(ref):
            ref.transformer.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
            return ref.transformer.disable_cache

        return TaylorSeer(), enable
    import cache_dit

    if name == "dbcache":
        front = min(8, layers // 2)  # cache-dit's default front blocks (fewer on the tiny plumbing model)
        config = dict(Fn_compute_blocks=front, Bn_compute_blocks=0, residual_diff_threshold=args.db_threshold,
                      max_warmup_steps=8)
        ours = DBCache(front_blocks=front, residual_diff_threshold=args.db_threshold, warmup_steps=8,
                       taylorseer_order=1)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    else:  # fixed: every 2nd step, block 0 always
        config = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, steps_computation_policy="static",
                      steps_computation_mask=[int(i % 2 == 0) for i in range(steps)])
        ours, calibrator = FixedSchedule(every=2), None

    def enable(ref):
        cache_dit.enable_cache(ref, cache_config=cache_dit.DBCacheConfig(enable_separate_cfg=True, **config),
                               calibrator_config=calibrator)
        return lambda: cache_dit.disable_cache(ref)

    return ours, enable


@contextmanager
def watched(transformer, record: dict):
    """Per guidance branch, the steps whose middle block ran (diffusers calls cond, then uncond, per step)."""
    calls, computed = [], []
    middle = transformer.transformer_blocks[len(transformer.transformer_blocks) // 2]
    hooks = [transformer.img_in.register_forward_pre_hook(lambda m, a: calls.append(1)),
             middle.img_mod.register_forward_pre_hook(lambda m, a: computed.append(len(calls) - 1))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    record.update(cond=[c // 2 for c in computed if c % 2 == 0], uncond=[c // 2 for c in computed if c % 2 == 1])


def steps_text(steps: dict, total: int) -> str:
    return " / ".join(f"{len(steps.get(name, []))}" for name in ("cond", "uncond")) + f" of {total}"


def decision_overhead(ours, scale, size: int, runs: int) -> list[list[str]]:
    """One batched DiT call: plain, and through gates that measure and store on every call but never skip (each call
    at another timestep, so the residual moves: identical calls would be skipped)."""
    call = dit_call(replace(scale, height=size, width=size), batch=2)
    dit = ours.dit
    h, w = call.grid
    rotary = qwen_rotary([ImageGrid(0, h, w)], call.text.shape[1], device=call.tokens.device,
                         axes_dim=dit.config.axes_dim)
    gates = {"First-Block Cache gate (threshold 0)": FirstBlockCache(threshold=0.0),
             "DBCache gate, 8 front blocks (threshold 1e-9)": DBCache(front_blocks=min(8, dit.config.num_layers // 2),
                                                                      residual_diff_threshold=1e-9, warmup_steps=0)}
    caches = {name: start_cache(setting, dit.config.num_layers) for name, setting in gates.items()}
    counters = {name: 0 for name in ("plain", *gates)}
    sigmas = [call.sigma * (1 - k / 200) for k in range(100)]

    def plain():
        counters["plain"] += 1
        with torch.no_grad():
            dit(call.tokens, call.text, sigmas[counters["plain"] % 100], rotary)

    def gated(name):
        def run():
            step = counters[name] = counters[name] + 1
            with torch.no_grad():
                caches[name].forward(step, ("cond", "uncond"), lambda gate: dit(
                    call.tokens, call.text, sigmas[step % 100], rotary, block_gate=gate))
        return run

    timings = interleaved({"plain DiT call": plain, **{name: gated(name) for name in gates}}, runs=runs, warmup=2,
                          calls=3)
    base = timings["plain DiT call"].median
    rows = [["plain DiT call (batch 2)", timings["plain DiT call"].text("ms", 1), ""]]
    for name in gates:
        assert all(len(r.skipped) == 0 for r in caches[name].log.records.values())  # it measured, never skipped
        rows.append([name, timings[name].text("ms", 1), f"{100 * (timings[name].median / base - 1):+.2f}%"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=1328)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--methods", default=",".join(METHODS) + ",overhead",
                        help=f"comma-separated: {', '.join(METHODS)}, overhead")
    parser.add_argument("--threshold", type=float, default=0.3, help="First-Block Cache threshold")
    parser.add_argument("--db-threshold", type=float, default=0.3, help="DBCache residual_diff_threshold")
    parser.add_argument("--compile", action="store_true", help="also time our compiled pipeline")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS) - {"overhead"}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}, overhead")
    size, steps = args.size, args.steps
    scale = replace(scale_named(args.scale), height=size, width=size)
    transformer = reference_dit(scale)
    text_config = released_text_encoder_config() if args.scale == "full" else None
    ours, ref = pipeline_pair(scale, transformer, our_dit(transformer, scale), ROOT / "bench/.tokenizer", text_config)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(scale.dtype)

    if args.compile:
        ours.compile()

    def run_ours(cache=None):
        return ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, num_inference_steps=steps, height=size,
                    width=size, noise=noise, progress_bar_cmd=lambda x: x, output_type="latent", cache=cache)

    def run_ref():
        with torch.no_grad():
            latents = ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=steps,
                          height=size, width=size, latents=patchify(noise.to(scale.device)),
                          output_type="latent").images
        return ref._unpack_latents(latents, size, size, ref.vae_scale_factor)[:, :, 0]

    header = ["method (setting)", "steps computed cond / uncond: reference", "qistudio", "reference image",
              "qistudio image", "qistudio uncached (same rounds)", "qistudio speed-up over uncached",
              "qistudio vs reference", "latents rel. err."]
    rows, overhead_rows = [], []
    what = (f"Step caching, {size}x{size}, {steps} steps, guidance 4 (qistudio batches the branches; diffusers runs "
            f"them one after the other), the same random {scale.name}-size weights; diffusers eager, qistudio "
            f"{'compiled' if args.compile else 'eager'}.")

    def report(load) -> None:  # rewritten after every row: a run cut by its time cap keeps the rows it finished
        text = caption(what, f"whole images (text encoding + denoising, no decode), median (min-max) of {args.runs} "
                             "interleaved rounds after a warm-up, wall clock", load.text())
        text += "\n\n" + markdown_table(header, rows) if rows else ""
        if overhead_rows:
            text += "\n\nDeciding, per DiT call (median (min-max) of 3-call runs):\n\n"
            text += markdown_table(["DiT call", "time", "over plain"], overhead_rows)
        write_report("step_cache.md", text)

    with card_load() as load:
        for name in (m for m in methods if m in METHODS):
            ours_setting, enable = settings(name, args, steps, ours.dit.config.num_layers)
            undo = enable(ref)
            try:
                ref_steps = {}
                with watched(ref.transformer, ref_steps):
                    ref_latents = run_ref()
                ours_latents = run_ours(ours_setting)
                ours_steps = ours.last_cache_report["computed_steps"]
                cases = {"ref": run_ref, "ours": lambda s=ours_setting: run_ours(s), "plain": run_ours}
                t = interleaved(cases, runs=args.runs, warmup=1, wall=True)
            finally:
                undo()
            rows.append([f"{name} (`{setting_text(ours_setting)}`)", steps_text(ref_steps, steps),
                         steps_text(ours_steps, steps) + ("" if ours_steps == ref_steps else " (differs)"),
                         t["ref"].text(), t["ours"].text(), t["plain"].text(),
                         f"{t['plain'].median / t['ours'].median:.2f}x", f"{t['ref'].median / t['ours'].median:.2f}x",
                         f"{rel_err(ours_latents.float(), ref_latents.float()):.1e}"])
            report(load)
        if "overhead" in methods:
            overhead_rows = decision_overhead(ours, scale, size, max(args.runs, 5))
    report(load)


if __name__ == "__main__":
    main()
