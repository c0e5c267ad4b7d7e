"""GPU benchmark: the Qwen-Image DiT from quantised files (GGUF Q8_0, Q4_K_M; bitsandbytes NF4), qistudio against
diffusers loading the same file, and against our resident bf16 DiT.

Random full-size weights (real config, 20.4B parameters) are built once in bf16 by diffusers' class on the GPU; our
DiT shares them (the bf16 baseline), and each file is written from them by `qistudio quantize`'s writers (block
linears quantised on the GPU, the rest as ComfyUI-GGUF / bitsandbytes keep it). Then, one type at a time, both
sides load the file (ours: `load_model`, weights kept quantised, Triton decode kernels; diffusers:
`from_single_file(..., GGUFQuantizationConfig(compute_dtype=bf16))` for GGUF, `from_pretrained` of the NF4 folder
with its BitsAndBytesConfig) and one DiT forward at 1328x1328 (batch 2: guidance batched, 128 text tokens) is timed,
the two sides interleaved (bench/timing.py). Memory: GPU bytes the weights hold, the forward's peak above them, and
the host's peak resident memory while loading (anonymous, and with the file's page-cache pages the process maps),
sampled every 20 ms. Errors: relative L2 against diffusers on the same file, and against the bf16 DiT.

Targets (issue 31): Q8_0 and Q4_K_M steps <= 1.25x our bf16 step and >= 1.5x faster than diffusers' GGUF path.

    python bench/quantized.py [--types Q8_0 Q4_K_M NF4] [--runs 5] [--work DIR] [--compile]
    python bench/quantized.py --scale tiny --runs 1     # plumbing check on the CPU (diffusers' NF4 needs a GPU)

Files are kept in --work (default $TMPDIR/qistudio-quantized) and reused by a later run on the same machine
(about 46 GB for the three full-size files).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pair import dit_call, our_dit, reference_dit, rel_err, scale_named  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved, measure  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.gguf_write import plan_types, write_gguf  # noqa: E402
from qistudio.weights.nf4_write import write_nf4  # noqa: E402

GiB = 2**30
TOP_LEVEL = ["img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out"]  # kept in bf16 by both


class HostPeak:
    """Peak RssAnon and VmRSS (bytes) of this process while the block runs, above where they started."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.anon, self.total = interval, 0, 0

    @staticmethod
    def _read() -> tuple[int, int]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024
        return values.get("RssAnon", 0), values.get("VmRSS", 0)

    def __enter__(self):
        self.start = self._read()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M", "NF4"])
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qistudio-quantized")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile on both sides")
    args = parser.parse_args()
    scale = scale_named(args.scale)
    args.work.mkdir(parents=True, exist_ok=True)
    backend = "inductor" if scale.device == "cuda" else "aot_eager"
    call = dit_call(scale, args.batch)

    reference = reference_dit(scale)
    ours_bf16 = our_dit(reference, scale)
    if args.compile:
        compile_repeated_blocks(ours_bf16, backend=backend)
    expected = call.ours(ours_bf16).float()
    bf16 = measure(lambda: call.ours(ours_bf16), runs=args.runs, device=scale.device)
    files = write_files(reference, scale, args.types, args.work)
    del ours_bf16, reference
    gc.collect()
    if scale.device == "cuda":
        torch.cuda.empty_cache()

    rows = [["bf16 (resident)", "qistudio", "-", "-", "-", "-", bf16.text("ms", 1), "1.00x", "-", "-"]]
    header = ["file", "side", "GPU weights GiB", "forward peak GiB", "host peak GiB (anon / with file pages)",
              "file GiB", "DiT step", "vs our bf16", "ours faster by", "rel err vs diffusers / vs bf16"]
    load = None
    for qtype, path in files.items():
        sides = {"qistudio": lambda: load_model([path], dtype=scale.dtype, device=scale.device)[1]}
        if qtype != "NF4" or scale.device == "cuda":
            sides["diffusers"] = lambda: load_theirs(qtype, path, args.work, scale)
        models, memory, runs, outputs = {}, {}, {}, {}
        for side, loader in sides.items():
            models[side], memory[side] = loaded(loader, scale.device)
            model = models[side]
            if args.compile:
                compile_repeated_blocks(model, backend=backend)
            runs[side] = (lambda m=model: call.ours(m)) if side == "qistudio" else (lambda m=model: call.diffusers(m))
            outputs[side] = runs[side]().float()
            memory[side]["forward"] = forward_peak(runs[side], scale.device)
        with card_load() as load:
            timings = interleaved(runs, runs=args.runs, device=scale.device)
        for side in sides:
            theirs = timings.get("diffusers")
            speedup = f"{theirs.median / timings[side].median:.2f}x" if side == "qistudio" and theirs else "-"
            errors = (f"{rel_err(outputs[side], outputs['diffusers']):.2e} / " if "diffusers" in outputs and
                      side == "qistudio" else "- / ") + f"{rel_err(outputs[side], expected):.2e}"
            m = memory[side]
            rows.append([qtype, side, f"{m['weights'] / GiB:.2f}", f"{m['forward'] / GiB:.2f}",
                         f"{m['host_anon'] / GiB:.2f} / {m['host_total'] / GiB:.2f}",
                         f"{path.stat().st_size / GiB:.2f}", timings[side].text("ms", 1),
                         f"{timings[side].median / bf16.median:.2f}x", speedup, errors])
        if "diffusers" not in sides:
            rows.append([qtype, "diffusers", "(needs a GPU: bitsandbytes' 4-bit loading)", *["-"] * 7])
        del models, runs, outputs
        gc.collect()
        if scale.device == "cuda":
            torch.cuda.empty_cache()
        text = caption(f"Qwen-Image DiT forward from quantised files, {scale.name} size, {scale.height}x"
                       f"{scale.width}, batch {args.batch}, {scale.text_len} text tokens, {scale.dtype}"
                       f"{', regional compile' if args.compile else ', eager'}.",
                       f"median (min-max) of {args.runs} interleaved runs per side, CUDA events",
                       load.text() if load else None)
        write_report("quantized.md", text + "\n\n" + markdown_table(header, rows), echo=qtype == list(files)[-1])


if __name__ == "__main__":
    main()
