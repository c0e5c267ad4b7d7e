"""bench/quantized.py: the one-H100 command its docstring gives parses to half the blocks at full width, and its
--smoke run goes through every file type on the CPU (tiny 256-wide DiT: Q4_K_M's K-quant rows apply)."""

import sys

import pytest

from conftest import ROOT

pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT))

from bench import quantized  # noqa: E402
from qistudio.weights.gguf_io import read_gguf_layout  # noqa: E402


def test_the_documented_h100_command_runs_half_the_blocks_at_full_width():
    command = "python bench/quantized.py --blocks 30 --runs 5"
    assert command in quantized.__doc__
    args = quantized.parse(command.split()[2:])
    assert (args.blocks, args.full_blocks, args.runs) == (30, 60, 5) and args.scale.dit["num_layers"] == 30
    assert args.scale.height == args.scale.width == 1328 and args.types == ["Q8_0", "Q4_K_M", "NF4"]
    with pytest.raises(SystemExit):
        quantized.parse(["--blocks", "61"])


@pytest.mark.usefixtures("one_thread")
def test_smoke_run_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    quantized.main(["--smoke", "--blocks", "1", "--work", str(tmp_path / "work")])
    table = (tmp_path / "quantized.md").read_text()
    assert "smoke run: a tiny 256-wide DiT, 1 of the model's 2 blocks" in table
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    sides = {(row[0], row[1]): row for row in rows[1:]}
    assert set(sides) == {("bf16 (resident)", "qistudio"), ("Q8_0", "qistudio"), ("Q8_0", "diffusers"),
                          ("Q4_K_M", "qistudio"), ("Q4_K_M", "diffusers"), ("NF4", "qistudio"), ("NF4", "diffusers")}
    for qtype in ("Q8_0", "Q4_K_M"):  # the same file, the same numbers as diffusers'
        ours_error = float(sides[(qtype, "qistudio")][9].split("/")[0])
        assert ours_error < 1e-5 and sides[(qtype, "qistudio")][6].endswith("n=1)")
    assert "needs a GPU" in sides[("NF4", "diffusers")][2]
    written = read_gguf_layout(tmp_path / "work" / "transformer" / "dit-Q4_K_M.gguf")[0]
    assert "Q4_K" in {tensor.type_name for tensor in written.values()}


def test_the_pipeline_benchmarks_documented_command_is_the_full_q4_k_m_case():
    from bench import quantized_pipeline

    command = "python bench/quantized_pipeline.py --steps 8"
    assert command in quantized_pipeline.__doc__
    args = quantized_pipeline.parse(command.split()[2:])
    assert (args.steps, args.size, args.vram_limit, args.host_limit, args.bf16) == (8, 1328, 12.0, 16.0, False)
    smoke = quantized_pipeline.parse(["--smoke"])
    assert (smoke.steps, smoke.size, smoke.vram_limit) == (2, 64, 0.0)


def test_the_pipeline_benchmarks_smoke_run_loads_the_files_in_a_fresh_process(tmp_path, monkeypatch):
    """The files are written (DiT in Q4_K_M, the text encoder as llama.cpp's GGUF + mmproj), a child process runs
    a whole image from them under the plan (vram_limit=0: everything streams or visits), and its host memory is
    sampled from here."""
    from bench import quantized_pipeline
    from qistudio.weights.gguf_io import read_gguf_layout

    monkeypatch.setenv("OUT", str(tmp_path))
    work = tmp_path / "work"
    quantized_pipeline.main(["--smoke", "--work", str(work)])
    table = (tmp_path / "quantized_pipeline.md").read_text()
    assert "smoke run: tiny models on the CPU" in table and "2 steps, vram_limit=0" in table
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1][0] == "Q4_K_M files"
    files, plan, load, image, step, encode_decode, gpu, host, gpu_budget, host_budget = rows[1]
    assert "dit: stream (0/2 blocks resident)" in plan and "text_encoder: stream" in plan
    assert float(image.split()[0]) > float(step.split()[0]) > 0 and float(encode_decode.split()[0]) > 0
    anon, total = (_mib(part) for part in host.split("/"))
    assert 0 < anon <= total and (gpu, gpu_budget, host_budget) == ("-", "- (CPU)", "**met**")
    files = quantized_pipeline.case_files(work, "Q4_K_M")
    assert "Q4_K" in {t.type_name for t in read_gguf_layout(files.dit)[0].values()}
    text_layout, metadata = read_gguf_layout(files.text_encoder)
    assert metadata["general.architecture"] == "qwen2vl" and "blk.0.attn_q.weight" in text_layout
    assert read_gguf_layout(files.mmproj)[1]["general.architecture"] == "clip"


def _mib(text: str) -> float:
    value, unit = text.split()
    return float(value) * (1024 if unit == "GiB" else 1)
