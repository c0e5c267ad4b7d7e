"""GPU benchmark: the full fine-tune of the 20B DiT on several GPUs, qistudio's FSDP2 and DeepSpeed ZeRO-3 against
DiffSynth-Studio 2.1.12's train.py under the seed's ZeRO-3 config, on the same machine; and on one GPU, FSDP2 with
one process against the plain step, on a shrunken DiT of the full width (memory per parameter).

One command each (the lead's runs; prepare is done first when the folder lacks the weights):

    # 4 GPUs: fsdp2, zero3 and DiffSynth-Studio 2.1.12 (its train.py from a checkout; the diffsynth package installed)
    python bench/train_scale.py all /data/scale --gpus 4 \
        --diffsynth-train DiffSynth-Studio/examples/qwen_image/model_training/train.py
    # 1 GPU: the plain step against FSDP2 with one process, 8 full-width blocks (2.7B parameters)
    python bench/train_scale.py single /data/scale1
    # the CPU, a tiny model: the same code paths, no numbers worth reading (tests/test_bench_train_scale.py)
    python bench/train_scale.py all --smoke;  python bench/train_scale.py single --smoke

Parts: `prepare FOLDER [--blocks N --text-layers M]`, then `run FOLDER --gpus G [--cases ...]` (`all` is both; for
the 2 -> 4 scaling run `run FOLDER --gpus 2 --cases fsdp2` beside the 4-GPU one).

`prepare` writes random bf16 weights (normal, std 0.02) under the released checkpoints' names and shapes
(tests/data/checkpoints: the 20.4B DiT in 9 shards, the 8.3B text encoder, the VAE; 57 GB), or, with --blocks /
--text-layers, the first N DiT blocks and M text-encoder layers of them (every tensor at its full width), their
config files, the Qwen2.5 tokenizer (built offline) and 16 random 1024x1024 images with prompts. `run` trains each
case for --steps optimizer steps, one 1024x1024 sample per GPU per step (batch 1 per GPU, gradient checkpointing,
AdamW, prompts encoded at every step as both trainers do by default), each case a fresh process tree of its own:
  fsdp2      qistudio train, examples/model_training/full/accelerate_config_fsdp2.yaml
  zero3      qistudio train, examples/model_training/full/accelerate_config_zero3.yaml (the DiT loaded partitioned)
  diffsynth  DiffSynth-Studio's train.py (give its path) with the same ZeRO-3 config (the seed's, which DiffSynth-Studio
             ships as accelerate_config_zero3.yaml) and its own arguments, --initialize_model_on_cpu as it needs
  plain      qistudio train in one process, no launcher and no sharding (`single`: the baseline FSDP2 must match)
Per case: seconds per step (median over the steps after --warmup, min-max beside it; ours from the loss.csv
timestamps, DiffSynth's from its progress bar's elapsed time), images per second (GPUs / step time), the peak
memory of each GPU as nvidia-smi sees it (sampled every 0.5 s: everything the process holds, CUDA context and the
allocator's reserve included, so both trainers are counted alike; for ours also what PyTorch allocated at most, from
its progress bar), and that peak per DiT parameter (PyTorch's where known: weights, gradients, optimizer state and
activations together; `single` trains from a sample cache, so the encoders are not on the GPU while the DiT
trains). A case that fails (out of memory) says so in its row. The table goes to stdout and $OUT/train_scale.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import caption, markdown_table, write_report  # noqa: E402

LISTINGS = ROOT / "tests" / "data" / "checkpoints"
CONFIGS = ROOT / "examples" / "model_training" / "full"
CASES = ("fsdp2", "zero3", "diffsynth", "plain")
CONFIG_OF = {"fsdp2": "accelerate_config_fsdp2.yaml", "zero3": "accelerate_config_zero3.yaml",
             "diffsynth": "accelerate_config_zero3.yaml"}
DIT_CONFIG = dict(_class_name="QwenImageTransformer2DModel", patch_size=2, in_channels=64, out_channels=16,
                  num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                  guidance_embeds=False, axes_dims_rope=[16, 56, 56])
SHARD_BYTES = 5 * 2**30
SINGLE_BLOCKS, SINGLE_TEXT_LAYERS = 8, 2  # `single`: 8 of the 60 blocks at full width (2.7B), a 2-layer encoder
# Where the numbered parts of each checkpoint are (a name's first index after one of these is its block or layer).
NUMBERED = {"qwen_image_transformer": ("transformer_blocks.",),
            "qwen_image_text_encoder": ("model.layers.", "visual.blocks.")}


# --- prepare ---------------------------------------------------------------------------------------------------------
def listed_tensors(listing: str, keep: dict[str, int] | None = None) -> dict[str, list[int]]:
    """A released checkpoint's {name: shape}; with `keep` ({prefix: count}), only the first `count` blocks or
    layers under each prefix (the rest of the checkpoint whole): a shrunken model of the full width."""
    tensors = json.loads((LISTINGS / f"{listing}.json").read_text())["tensors"]
    if not keep:
        return tensors
    kept = {}
    for name, shape in tensors.items():
        prefix = next((p for p in keep if name.startswith(p)), None)
        if prefix is None or int(name[len(prefix):].split(".")[0]) < keep[prefix]:
            kept[name] = shape
    return kept


def write_random_checkpoint(tensors: dict[str, list[int]], folder: Path, stem: str, seed: int) -> None:
    """Random bf16 tensors of these names and shapes, sharded with an index file."""
    import torch
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, shape in tensors.items():
        current[name] = shape
        size += 2 * max(1, int(torch.tensor(shape).prod())) if shape else 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards, start=1):
        name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{stem}.safetensors"
        out = {key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for key, shape in shard.items()}
        save_file(out, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        print(f"  {folder.name}/{name}", flush=True)
    if len(shards) > 1:
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))


def text_encoder_config(tensors: dict[str, list[int]]):
    """The transformers config of a text encoder with these tensors (released names, as the listing has them)."""
    from qistudio.models.text_encoder import text_encoder_config_from_shapes
    from qistudio.weights.formats import detect_layout

    layout = detect_layout(tensors.keys(), "the text encoder listing")
    return text_encoder_config_from_shapes({layout.key_map(k): tuple(v) for k, v in tensors.items()})


def prepare(folder: Path, blocks: int | None = None, text_layers: int | None = None) -> None:
    """Random weights in the released layout (shrunken to `blocks` DiT blocks and `text_layers` encoder layers,
    one vision block, when given), configs, tokenizer and 16 images."""
    import numpy as np
    from PIL import Image

    from qistudio.tokenizer_build import write_qwen25_tokenizer

    dit_keep = {"transformer_blocks.": blocks} if blocks else None
    write_random_checkpoint(listed_tensors("qwen_image_transformer", dit_keep), folder / "transformer",
                            "diffusion_pytorch_model", 1)
    (folder / "transformer" / "config.json").write_text(json.dumps(dict(DIT_CONFIG, num_layers=blocks or 60), indent=1))
    text_keep = {"model.layers.": text_layers, "visual.blocks.": 1} if text_layers else None
    text = listed_tensors("qwen_image_text_encoder", text_keep)
    write_random_checkpoint(text, folder / "text_encoder", "model", 2)
    text_encoder_config(text).to_json_file(str(folder / "text_encoder" / "config.json"))
    write_random_checkpoint(listed_tensors("qwen_image_vae"), folder / "vae", "diffusion_pytorch_model", 3)
    (folder / "vae" / "config.json").write_text(json.dumps(_diffusers_vae_defaults(), indent=1))
    write_qwen25_tokenizer(folder / "tokenizer")
    data = folder / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(data / f"{k:02d}.png")
        rows.append({"image": f"{k:02d}.png", "prompt": f"random picture number {k}, noise in many colours"})
    with open(data / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)


def _diffusers_vae_defaults() -> dict:
    """diffusers' AutoencoderKLQwenImage defaults: the released VAE's config."""
    import inspect

    from diffusers import AutoencoderKLQwenImage

    defaults = {k: v.default for k, v in inspect.signature(AutoencoderKLQwenImage.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    return {"_class_name": "AutoencoderKLQwenImage", **defaults}


def prepared(folder: Path) -> bool:
    return (folder / "data" / "metadata.csv").exists() and (folder / "transformer" / "config.json").exists()


# --- run -------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_config(name: str, processes: int, cpu: bool, folder: Path) -> Path:
    import yaml

    settings = yaml.safe_load((CONFIGS / name).read_text())
    settings.update(num_processes=processes, main_process_port=free_port(), use_cpu=cpu)
    if cpu:
        settings["mixed_precision"] = "no"
    path = folder / name
    path.write_text(yaml.safe_dump(settings))
    return path


def model_paths(repo: Path) -> list:
    return [sorted(str(p) for p in (repo / "transformer").glob("*.safetensors")),
            sorted(str(p) for p in (repo / "text_encoder").glob("*.safetensors")),
            str(repo / "vae" / "diffusion_pytorch_model.safetensors")]


def dit_parameters(repo: Path) -> int:
    """The DiT's parameter count, from its files' headers."""
    from safetensors import safe_open

    total = 0
    for path in (repo / "transformer").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def case_command(case: str, repo: Path, out: Path, args, config: Path | None) -> list[str]:
    data = repo / "data"
    common = ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
              "--model_paths", json.dumps(model_paths(repo)), "--tokenizer_path", str(repo / "tokenizer"),
              "--trainable_models", "dit", "--learning_rate", "1e-5", "--use_gradient_checkpointing",
              "--remove_prefix_in_ckpt", "pipe.dit.", "--output_path", str(out)]
    size = ["--height", str(args.size), "--width", str(args.size)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    # enough samples for --steps optimizer steps over all processes
    repeat = str(-(-args.steps * args.gpus // 16))
    if case == "diffsynth":
        return launch + [str(args.diffsynth_train), *common, *size, "--dataset_repeat", repeat,
                         "--initialize_model_on_cpu", "--num_epochs", "1", "--dataset_num_workers", "2"]
    ours = ["--module", "qistudio.cli.main", "train", *common, *size, "--dataset_repeat", repeat,
            "--max_steps", str(args.steps), "--save_steps", str(10**9), "--enable_csv_log",
            "--optimizer", args.optimizer]
    if args.cache:  # the encoders leave the device before the DiT trains: its memory is the DiT's alone
        ours += ["--cache", str(out / "cache")]
    if case == "plain":
        return [sys.executable, "-m", *ours[1:]]
    return launch + ours


class MemorySampler:
    """The most memory each GPU used while the block ran (nvidia-smi, every 0.5 s)."""

    def __enter__(self):
        self.peak: dict[int, float] = {}
        try:
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,"
                                             "nounits", "--loop-ms=500"], stdout=subprocess.PIPE, text=True,
                                            stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None
        return self

    def __exit__(self, *exc):
        if self.process is None:
            return
        self.process.terminate()
        for line in self.process.communicate()[0].splitlines():
            parts = line.split(",")
            if len(parts) == 2 and all(p.strip().replace(".", "").isdigit() for p in parts):
                gpu, used = int(parts[0]), float(parts[1])
                self.peak[gpu] = max(self.peak.get(gpu, 0.0), used)


def our_step_times(out: Path, warmup: int) -> list[float]:
    rows = list(csv.DictReader(open(out / "loss.csv")))
    stamps = [float(r["time"]) for r in rows]
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def progress_step_times(output: str, warmup: int) -> list[float]:
    """Seconds per step from a tqdm bar's refreshes ('n/N [MM:SS<...'): elapsed between consecutive counts."""
    seen: dict[int, float] = {}
    for n, minutes, seconds in re.findall(r"(\d+)/\d+ \[(\d+):(\d\d)<", output):
        seen.setdefault(int(n), int(minutes) * 60 + int(seconds))
    counts = sorted(seen)
    if len(counts) < warmup + 2:
        return []
    first, last = counts[warmup], counts[-1]
    return [(seen[last] - seen[first]) / (last - first)]


def run_case(case: str, repo: Path, args, work: Path) -> list[str]:
    processes = 1 if case == "plain" else args.gpus
    config = accelerate_config(CONFIG_OF[case], processes, args.cpu, work) if case in CONFIG_OF else None
    out = work / case
    command = case_command(case, repo, out, args, config)
    # ROOT first, then whatever the caller had (the device's wheels live on PYTHONPATH).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    with MemorySampler() as memory:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    (work / f"{case}.log").write_text(output)
    if done.returncode != 0:
        reason = "out of memory" if "out of memory" in output.lower() else f"failed (status {done.returncode})"
        print(f"{case} failed; the end of its output:\n{output[-4000:]}", file=sys.stderr)
        return [case, reason, "", "", "", "", f"{wall:.0f}"]
    if not engaged(case, out, output):
        return [case, "ran without its engine (see the log)", "", "", "", "", f"{wall:.0f}"]
    steps = our_step_times(out, args.warmup) if case != "diffsynth" else progress_step_times(output, args.warmup)
    if not steps:
        return [case, "no step times found", "", "", "", "", f"{wall:.0f}"]
    median = statistics.median(steps)
    spread = f"{min(steps):.2f}-{max(steps):.2f}" if len(steps) > 1 else "(one mean)"
    peaks = [memory.peak[g] * 2**20 for g in sorted(memory.peak)]
    shown = ", ".join(f"{peak / 2**30:.1f}" for peak in peaks) or "n/a (no nvidia-smi)"
    allocated = torch_peak(output)  # ours: what PyTorch allocated at most on the main process's GPU
    if allocated is not None:
        shown += f" (allocated {allocated / 2**30:.1f})"
    # Every GPU holds 1/N of the sharded state: the peak over the parameters of one GPU's share.
    peak = allocated if allocated is not None else max(peaks, default=None)
    per_parameter = f"{peak * processes / args.parameters:.1f}" if peak else "n/a"
    return [case, f"{median:.3f}", spread, f"{processes / median:.3f}", shown, per_parameter, f"{wall:.0f}"]


def torch_peak(output: str) -> float | None:
    """The last peak our trainer's progress bar showed (torch.cuda.max_memory_allocated, GiB), in bytes."""
    shown = re.findall(r"peak=([\d.]+)GiB", output)
    return float(shown[-1]) * 2**30 if shown else None


def engaged(case: str, out: Path, output: str) -> bool:
    """Whether our case ran as it says: FSDP2 wrote sharded checkpoints, ZeRO-3 loaded the DiT partitioned."""
    if case == "fsdp2":
        return any((out / "checkpoints").glob("*/sharded"))
    if case == "zero3":
        return "ZeRO-3: process 0 allocated" in output
    return True


def run(repo: Path, args) -> list[list[str]]:
    """Each case of args.cases, one row each; the table to stdout and $OUT/train_scale.md."""
    args.parameters = dit_parameters(repo)
    with tempfile.TemporaryDirectory(prefix="train_scale.", dir=args.work) as work:
        rows = [run_case(case, repo, args, Path(work)) for case in args.cases]
    header = ["case", "s/step (median)", "min-max", "images/s", "peak GiB per GPU (nvidia-smi; torch's allocated)",
              "peak bytes per DiT parameter (x processes)", "wall s"]
    model = (f"the tiny demo DiT on the CPU (smoke run: the code paths, no numbers worth reading)" if args.cpu else
             f"the DiT at full width, {args.parameters / 1e9:.2f}B parameters (random weights)")
    text = caption(f"Full fine-tune of {model}, {args.gpus} GPU(s), {args.size}x{args.size}, batch 1 per process, "
                   f"AdamW ({args.optimizer} for ours), gradient checkpointing; each case its own launch"
                   + (", training from a sample cache" if args.cache else "") + ".",
                   f"median of the steps after {args.warmup} warm-up steps of {args.steps}")
    write_report("train_scale.md", text + "\n\n" + markdown_table(header, rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_parser = sub.add_parser("prepare")
    prepare_parser.add_argument("folder", type=Path)
    for p in (prepare_parser,):
        p.add_argument("--blocks", type=int, help="only the first N DiT blocks (full width)")
        p.add_argument("--text-layers", type=int, help="only the first M text-encoder layers (full width)")
    for name in ("run", "all", "single"):
        p = sub.add_parser(name)
        p.add_argument("folder", type=Path, nargs="?" if name != "run" else None)
        p.add_argument("--smoke", action="store_true", help="the CPU and the tiny demo model: the code paths only")
        p.add_argument("--gpus", type=int, default=1 if name == "single" else 4)
        p.add_argument("--cases", nargs="+", choices=CASES,
                       default=["plain", "fsdp2"] if name == "single" else ["fsdp2", "zero3", "diffsynth"])
        p.add_argument("--diffsynth-train", type=Path)
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--size", type=int, default=1024)
        p.add_argument("--optimizer", default="adamw")
        p.add_argument("--timeout", type=int, default=3600)
        p.add_argument("--work", default=None, help="folder for outputs and logs (default: the system's temp)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.folder, args.blocks, args.text_layers)
        return
    args.cpu, args.cache = args.smoke, args.command == "single"
    if args.smoke:
        smoke(args)
        return
    if "diffsynth" in args.cases and not args.diffsynth_train:
        parser.error("the diffsynth case needs --diffsynth-train (DiffSynth-Studio 2.1.12's "
                     "examples/qwen_image/model_training/train.py), or leave it out of --cases")
    if args.folder is None:
        parser.error("give the folder of the prepared weights (or --smoke)")
    if args.command == "single" and args.gpus != 1:
        parser.error("single runs on one GPU")
    if args.command != "run" and not prepared(args.folder):
        shrink = (SINGLE_BLOCKS, SINGLE_TEXT_LAYERS) if args.command == "single" else (None, None)
        prepare(args.folder, *shrink)
    run(args.folder, args)


def smoke(args) -> None:
    """The cases on the CPU with the tiny demo model (2 gloo processes for `all`, one for `single`); DiffSynth's
    trainer is left out (it is the GPU run's peer)."""
    from qistudio.demo import write_demo_model
    from qistudio.training.demo_data import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="train_scale_smoke.", dir=args.work) as folder:
        repo = write_demo_model(Path(folder) / "demo")
        write_demo_dataset(repo / "data")
        args.gpus = 1 if args.command == "single" else 2
        args.cases = [c for c in args.cases if c != "diffsynth"]
        args.steps, args.warmup, args.size, args.timeout, args.work = 3, 1, 64, 600, folder
        rows = run(repo, args)
    failed = [row[0] for row in rows if not row[1].replace(".", "").isdigit()]
    if failed:
        sys.exit(f"train_scale smoke: {', '.join(failed)} failed (output above)")


if __name__ == "__main__":
    main()
