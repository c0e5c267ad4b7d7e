"""GPU benchmark: the Qwen-Image DiT from quantised files (GGUF Q8_0, Q4_K_M; bitsandbytes NF4), qistudio against
diffusers loading the same file, and against our resident bf16 DiT.

Random full-width weights (the released config; `--blocks` of its 60 blocks) are built once in bf16 by diffusers'
class on the GPU; our DiT shares them (the bf16 baseline), and each file is written from them by `qistudio
quantize`'s writers (block linears quantised on the GPU, the rest as ComfyUI-GGUF / bitsandbytes keep it). Then,
one type at a time, both sides load the file (ours: `load_model`, weights kept quantised, Triton decode kernels;
diffusers: `from_single_file(..., GGUFQuantizationConfig(compute_dtype=bf16))` for GGUF, `from_pretrained` of the
NF4 folder with its BitsAndBytesConfig) and one DiT forward at 1328x1328 (batch 2: guidance batched, 128 text
tokens) is timed, the two sides interleaved (bench/timing.py). Memory: GPU bytes the weights hold, the forward's
peak above them, and the host's peak resident memory while loading (anonymous, and with the file's page-cache pages
the process maps), sampled every 20 ms. Errors: relative L2 against diffusers on the same file, and against bf16.

Targets (issue 31): Q8_0 and Q4_K_M steps <= 1.25x our bf16 step and >= 1.5x faster than diffusers' GGUF path.

The command for one H100 (80 GB, 64 GiB disk), about 8 minutes with the three files written (~21 GiB):

    python bench/quantized.py --blocks 30 --runs 5

Half the blocks (30 of 60, at the released width: every block linear has its real shape) halves the writing and
loading, which dominate; a step's time is a sum over identical blocks, so the ratios (vs bf16, vs diffusers) are
those of the full model and the absolute step is about half (the caption says how many blocks ran). `--blocks 60`
is the whole 20.4B model (~43 GiB of files, about 15 minutes). `--budget SECONDS` (default 480) skips a type that
would start too late to finish by then, judged by the type before (its row says so).

    python bench/quantized.py --smoke       # the plumbing on the CPU: a tiny 256-wide DiT, 1 run, files in a temp dir

Files are kept in --work (default $TMPDIR/qistudio-quantized) and reused by a later run with the same --blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from bench.pair import TINY, dit_call, our_dit, reference_dit, rel_err, scale_named  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved, measure  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.gguf_write import plan_types, write_gguf  # noqa: E402
from qistudio.weights.nf4_write import write_nf4  # noqa: E402

GiB, MiB = 2**30, 2**20
# --smoke: the tiny scale widened to 8 heads of 32, so the block linears take 256-value K-quant rows (Q4_K_M's).
SMOKE = replace(TINY, dit={**TINY.dit, "num_attention_heads": 8})


def size_text(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / MiB:.1f} MiB"
TOP_LEVEL = ["img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out"]  # kept in bf16 by both


class HostPeak:
    """Peak RssAnon and VmRSS (bytes) of a process (default this one) while the block runs, above where they started
    (relative=False: as they are, for a child process watched from its start)."""

    def __init__(self, interval: float = 0.02, pid: int | str = "self", relative: bool = True):
        self.interval, self.anon, self.total = interval, 0, 0
        self.pid, self.relative = pid, relative

    def _read(self) -> tuple[int, int]:
        values = {}
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    key, _, rest = line.partition(":")
                    if key in ("RssAnon", "VmRSS"):
                        values[key] = int(rest.split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass  # the watched process has ended
        return values.get("RssAnon", 0), values.get("VmRSS", 0)

    def __enter__(self):
        self.start = self._read() if self.relative else (0, 0)
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            anon, total = self._read()
            self.anon, self.total = max(self.anon, anon - self.start[0]), max(self.total, total - self.start[1])
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def write_files(reference, scale, types: list[str], work: Path) -> dict[str, Path]:
    """Each type's file under `work` (written from the reference's weights unless already there)."""
    from diffusers import QwenImageTransformer2DModel

    state = reference.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    dtypes = {name: t.dtype for name, t in state.items()}
    config = work / "transformer"  # the GGUF files sit beside it: our loader reads the RoPE axes there too
    config.mkdir(parents=True, exist_ok=True)
    json.dump({"_class_name": QwenImageTransformer2DModel.__name__, **scale.dit}, open(config / "config.json", "w"))
    files = {}
    for qtype in types:
        if qtype == "NF4":
            folder = work / "nf4"
            folder.mkdir(exist_ok=True)
            path = folder / "diffusion_pytorch_model.safetensors"
            quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": False,
                            "llm_int8_skip_modules": TOP_LEVEL}
            json.dump({"_class_name": QwenImageTransformer2DModel.__name__, **scale.dit,
                       "quantization_config": quantization}, open(folder / "config.json", "w"))
            if not path.exists():
                write_nf4(path, shapes, dtypes, lambda name: state[name], device=scale.device)
        else:
            path = config / f"dit-{qtype}.gguf"
            if not path.exists():
                write_gguf(path, shapes, plan_types(shapes, dtypes, qtype), lambda name: state[name], qtype)
        files[qtype] = path
        print(f"{qtype}: {path} ({path.stat().st_size / GiB:.2f} GiB)", flush=True)
    return files


def load_theirs(qtype: str, path: Path, work: Path, scale):
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    if qtype == "NF4":
        model = QwenImageTransformer2DModel.from_pretrained(str(path.parent), torch_dtype=scale.dtype)
    else:
        model = QwenImageTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=scale.dtype),
            config=str(work), subfolder="transformer", torch_dtype=scale.dtype)
    return model.to(scale.device).eval().requires_grad_(False)


def loaded(load, device) -> tuple[object, dict]:
    """(model, its memory: GPU weight bytes, host peaks while loading)."""
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    with HostPeak() as host:
        model = load()
    weights = (torch.cuda.memory_allocated() - before) if cuda else sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    return model, {"weights": weights, "host_anon": host.anon, "host_total": host.total}


def forward_peak(run, device) -> int:
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M", "NF4"])
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--blocks", type=int, help="transformer blocks to build (default: all of the scale's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, help="where the files go (default $TMPDIR/qistudio-quantized)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds: a type that would not finish by then is skipped (default 480)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile on both sides")
    parser.add_argument("--smoke", action="store_true",
                        help="the plumbing on the CPU: a tiny 256-wide DiT, 1 run, files in a temporary folder")
    args = parser.parse_args(argv)
    args.scale = SMOKE if args.smoke else scale_named(args.scale)
    if args.smoke:
        args.runs = 1
        args.work = args.work or Path(tempfile.mkdtemp(prefix="qistudio-quantized-smoke-"))
    full_blocks = args.scale.dit.get("num_layers", 60)
    if args.blocks is not None and not 1 <= args.blocks <= full_blocks:
        parser.error(f"--blocks {args.blocks}: choose 1 to {full_blocks}")
    args.full_blocks, args.blocks = full_blocks, args.blocks or full_blocks
    args.scale = replace(args.scale, dit={**args.scale.dit, "num_layers": args.blocks})
    args.work = args.work or Path(tempfile.gettempdir()) / "qistudio-quantized"
    args.work = args.work / f"blocks-{args.blocks}" if not args.smoke else args.work
    return args


class Clock:
    """Seconds since the start, printed with each phase (the budget is judged by them)."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start

    def say(self, what: str) -> None:
        print(f"[{self():.0f} s] {what}", flush=True)


def bench_type(qtype: str, path: Path, args, call, bf16, expected) -> list[list[str]]:
    """The rows of one file: each side loaded, checked against diffusers and bf16, timed interleaved."""
    scale = args.scale
    sides = {"qistudio": lambda: load_model([path], dtype=scale.dtype, device=scale.device)[1]}
    if qtype != "NF4" or scale.device == "cuda":
        sides["diffusers"] = lambda: load_theirs(qtype, path, args.work, scale)
    backend = "inductor" if scale.device == "cuda" else "aot_eager"
    models, memory, runs, outputs = {}, {}, {}, {}
    for side, loader in sides.items():
        models[side], memory[side] = loaded(loader, scale.device)
        if args.compile:
            compile_repeated_blocks(models[side], backend=backend)
        runs[side] = ((lambda m=models[side]: call.ours(m)) if side == "qistudio"
                      else (lambda m=models[side]: call.diffusers(m)))
        outputs[side] = runs[side]().float()
        memory[side]["forward"] = forward_peak(runs[side], scale.device)
    with card_load() as load:
        timings = interleaved(runs, runs=args.runs, device=scale.device)
    args.load = load
    rows = []
    for side in sides:
        theirs = timings.get("diffusers")
        speedup = f"{theirs.median / timings[side].median:.2f}x" if side == "qistudio" and theirs else "-"
        errors = (f"{rel_err(outputs[side], outputs['diffusers']):.2e} / " if "diffusers" in outputs and
                  side == "qistudio" else "- / ") + f"{rel_err(outputs[side], expected):.2e}"
        m = memory[side]
        rows.append([qtype, side, size_text(m["weights"]), size_text(m["forward"]),
                     f"{size_text(m['host_anon'])} / {size_text(m['host_total'])}", size_text(path.stat().st_size),
                     timings[side].text("ms", 1), f"{timings[side].median / bf16.median:.2f}x", speedup, errors])
    if "diffusers" not in sides:
        rows.append([qtype, "diffusers", "(needs a GPU: bitsandbytes' 4-bit loading)", *["-"] * 7])
    return rows


def report(args, rows: list[list[str]], echo: bool) -> None:
    scale = args.scale
    blocks = (f"{args.blocks} of the model's {args.full_blocks} blocks (released width; ratios as the full model's, "
              f"absolute steps about {args.blocks / args.full_blocks:.2g}x its)" if args.blocks != args.full_blocks
              else f"all {args.blocks} blocks")
    header = ["file", "side", "GPU weights", "forward peak (above weights)", "host peak while loading (anon / with "
              "file pages)", "file", "DiT step", "vs our bf16", "ours faster by", "rel err vs diffusers / vs bf16"]
    size = "smoke run: a tiny 256-wide DiT" if args.smoke else f"{scale.name} size"
    mode = "regional compile" if args.compile else "eager"
    text = caption(f"Qwen-Image DiT forward from quantised files, {size}, {blocks}, {scale.height}x{scale.width}, "
                   f"batch {args.batch}, {scale.text_len} text tokens, {scale.dtype}, {mode}.",
                   f"median (min-max) of {args.runs} interleaved runs per side, CUDA events",
                   args.load.text() if args.load else None)
    write_report("quantized.md", text + "\n\n" + markdown_table(header, rows), echo=echo)


def main(argv=None) -> None:
    args = parse(argv)
    clock, scale, args.load = Clock(), args.scale, None
    args.work.mkdir(parents=True, exist_ok=True)
    call = dit_call(scale, args.batch)
    reference = reference_dit(scale)
    ours_bf16 = our_dit(reference, scale)
    if args.compile:
        compile_repeated_blocks(ours_bf16, backend="inductor" if scale.device == "cuda" else "aot_eager")
    expected = call.ours(ours_bf16).float()
    bf16 = measure(lambda model=ours_bf16: call.ours(model), runs=args.runs, device=scale.device)
    clock.say(f"bf16 step {bf16.text('ms', 1)}; writing the files")
    files = write_files(reference, scale, args.types, args.work)
    del ours_bf16, reference
    gc.collect()
    if scale.device == "cuda":
        torch.cuda.empty_cache()
    clock.say("files ready")
    rows = [["bf16 (resident)", "qistudio", "-", "-", "-", "-", bf16.text("ms", 1), "1.00x", "-", "-"]]
    last = 0.0
    for index, (qtype, path) in enumerate(files.items()):
        if clock() + last > args.budget:
            rows.append([qtype, "skipped", f"the {args.budget:.0f} s budget would be exceeded (the last type took "
                         f"{last:.0f} s)", *["-"] * 7])
            clock.say(f"{qtype}: skipped (budget)")
        else:
            began = clock()
            rows += bench_type(qtype, path, args, call, bf16, expected)
            last = clock() - began
            clock.say(f"{qtype}: done in {last:.0f} s")
        gc.collect()
        if scale.device == "cuda":
            torch.cuda.empty_cache()
        report(args, rows, echo=index == len(files) - 1)


if __name__ == "__main__":
    main()
