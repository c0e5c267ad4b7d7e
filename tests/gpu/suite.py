"""The GPU suite's settings (which scale, which compiled paths, which compile backend) and its report of every
measured error, written for bench/RESULTS.md when the session ends.

QISTUDIO_GPU_SUITE_SIZE=full (default) is the released DiT at 1328x1328 in bf16 and needs CUDA (skipped
without, so CI skips it); =tiny is the two-block test model in float32 on the CPU, to check the suite's plumbing
where there is no GPU (CUDA-only paths are skipped with their reason). The report goes to
$QISTUDIO_GPU_SUITE_REPORT, else $OUT/gpu_suite.md where OUT is set.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from bench.pair import rel_err, scale_named

SIZE = os.environ.get("QISTUDIO_GPU_SUITE_SIZE", "full")
SCALE = scale_named(SIZE)
RUNS_HERE = SIZE == "tiny" or torch.cuda.is_available()
# Compiled paths: "core" (the bf16 and FP8 DiT forward), "all" (also EliGen's FlexAttention, LoRA hooks and the
# padded-batch pipeline, each a compilation of its own: about a minute each at full size).
COMPILE_LEVEL = os.environ.get("QISTUDIO_GPU_SUITE_COMPILE", "core")
# Full size: inductor. Tiny on the CPU: trace with fullgraph=True (graph breaks fail) without code generation.
COMPILE_BACKEND = os.environ.get("QISTUDIO_GPU_SUITE_COMPILE_BACKEND",
                                 "inductor" if SCALE.device == "cuda" else "aot_eager")


class Report:
    """Rows of (test, path, error, tolerance, verdict), one per comparison a test made."""

    def __init__(self):
        self.rows: list[tuple[str, str, float, float, str]] = []

    def check(self, test: str, path: str, ours: torch.Tensor, ref: torch.Tensor, tolerance: float) -> float:
        """Record ||ours - ref|| / ||ref|| for this path and assert it is finite and within `tolerance`."""
        err = rel_err(ours, ref)
        verdict = "pass" if math.isfinite(err) and err <= tolerance else "FAIL"
        self.rows.append((test, path, err, tolerance, verdict))
        self.write()  # after every row: a run cut short keeps what it measured
        assert verdict == "pass", f"{path}: rel. err {err:.3e} > tolerance {tolerance:.1e}"
        return err

    def markdown(self) -> str:
        from bench.report import caption, markdown_table

        what = (f"GPU correctness suite (tests/gpu), scale {SCALE.name}: {SCALE.height}x{SCALE.width}, "
                f"{SCALE.dit.get('num_layers', 60)} blocks, {str(SCALE.dtype).removeprefix('torch.')}, random weights "
                "shared by diffusers 0.42.1 and qistudio; errors are relative L2 against diffusers' eager output "
                "(native SDPA) unless the path says otherwise.")
        rows = [[test, path, f"{err:.2e}", f"{tol:.0e}", verdict] for test, path, err, tol, verdict in self.rows]
        return caption(what, "not timed (correctness only)") + "\n\n" + markdown_table(
            ["test", "fast path", "rel. err", "tolerance", "result"], rows)

    def write(self) -> Path | None:
        """To $QISTUDIO_GPU_SUITE_REPORT, else $OUT/gpu_suite.md (temporary file, then rename); None if neither."""
        target = os.environ.get("QISTUDIO_GPU_SUITE_REPORT")
        if target is None and os.environ.get("OUT"):
            target = str(Path(os.environ["OUT"], "gpu_suite.md"))
        if not target or not self.rows:
            return None
        path = Path(target)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.markdown() + "\n")
        tmp.replace(path)
        return path
