"""GPU check: DiT blocks streamed from their safetensors files (offload_device="disk") against the resident DiT.

A full-width DiT with fewer blocks (default 12 of 60: 8.2 GB in bf16) is saved as sharded safetensors, loaded back
through the library's loader with offload_device="disk", and run: outputs must equal the resident run exactly.
Times: resident, disk with a hot page cache, and disk after dropping the page cache (when the container allows).

    python bench/disk_offload.py [--layers 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.offload import inputs  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import MIN_RUNS, measure  # noqa: E402
from qistudio.components import load_components  # noqa: E402
from qistudio.memory.manager import MemoryManager  # noqa: E402
from qistudio.memory.plan import GiB, MemoryPlan, ModelPlan  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.weights.model_config import ModelConfig  # noqa: E402


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        dit = QwenImageDiT(DiTConfig(num_layers=args.layers)).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="disk-dit-"))
    state = {k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}
    keys = sorted(state)
    for index in range(4):
        part = {k: state[k] for k in keys[index::4]}
        save_file(part, str(folder / f"diffusion_pytorch_model-{index + 1:05d}-of-00004.safetensors"))
    del state
    nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tokens, text, sigma, rotary = inputs(2)

    def forward(model):
        with torch.no_grad():
            return model(tokens, text, sigma, rotary)

    resident = measure(lambda: forward(dit))
    expected = forward(dit).float()
    del dit
    torch.cuda.empty_cache()

    components = load_components([ModelConfig(path=str(folder), offload_device="disk")], None, None,
                                 torch.bfloat16, "cuda")
    disk_dit = components.dit
    blocks = len(disk_dit.transformer_blocks)
    plan = MemoryPlan(0, {"dit": ModelPlan("stream", resident_blocks=0, num_blocks=blocks)})
    manager = MemoryManager({"dit": disk_dit}, "cuda", plan, components.disk_sources)
    rows = [("resident", resident.text(), resident.median, 0.0)]
    with manager.phase("denoising", "dit"):
        torch.cuda.reset_peak_memory_stats()
        hot = measure(lambda: forward(disk_dit))
        err = ((forward(disk_dit).float() - expected).norm() / expected.norm()).item()
        rows.append(("disk, page cache hot", hot.text(), hot.median, err))
        peak = torch.cuda.max_memory_allocated() / GiB
    manager.release()
    if drop_page_cache():
        with manager.phase("denoising", "dit"):
            t0 = time.perf_counter()
            out = forward(disk_dit)
            torch.cuda.synchronize()
            cold = time.perf_counter() - t0
            err = ((out.float() - expected).norm() / expected.norm()).item()
            rows.append(("disk, page cache dropped (first forward, one run)", f"{cold:.3f} s (n=1)", cold, err))
    what = (f"DiT with {blocks} full-width blocks ({nbytes / 1e9:.1f} GB bf16 on disk) streamed from disk, "
            f"1328x1328, batch 2; peak while streaming {peak:.2f} GiB.")
    method = (f"median (min-max) of {MIN_RUNS} forwards after a warm-up, CUDA events; the dropped-cache row is one "
              "forward by its nature (the cache fills as it reads)")
    table = markdown_table(["case", "forward", "GB/s read", "rel. err vs resident"],
                           [[name, text, "" if name == "resident" else f"{nbytes / t / 1e9:.1f}", f"{e:.1e}"]
                            for name, text, t, e in rows])
    write_report("disk_offload.md", caption(what, method) + "\n\n" + table)


if __name__ == "__main__":
    main()
