"""Parallel generation on the CPU (gloo, 2 and 4 spawned ranks, the tiny demo model in float32) against the same
call in one process: every layout (cfg, Ulysses, ring, both, data), token counts no rank count divides, edit
images, EliGen entities, a Blockwise ControlNet, inpainting, LoRAs (hooks and fused), FP8 compute with FP8
attention under Ulysses, Qwen-Image 2.1 (cfg, data, Ulysses over its target with the prefix K/V cache split by
heads, ring and ring x Ulysses with the cached prefix one more partial of the merged softmax), Qwen-Image-Layered
(cfg with its caption, Ulysses, ring, data, cfg x Ulysses; its layers); a rank that dies; the CLI (Qwen-Image,
2.1 and `qistudio layers`).

The ranks are started once per rank count (module fixtures) through the library's own launcher and run every
case in a row, re-meshing between cases; each rank saves its final latents, which must equal the one-process
latents within 1e-5 relative and each other's exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import parallel_cases as cases
from conftest import rel_err
from qistudio.cli.main import main
from qistudio.demo import write_demo_model
from qistudio.parallel import ParallelError
from qistudio.parallel.launch import launch
from test_control import write_controlnet
from test_instantx_controlnet import reference_controlnet
from tiny_qwen21 import tiny_repository21

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo model, a tiny Blockwise and a tiny InstantX Union ControlNet, written once."""
    folder = tmp_path_factory.mktemp("parallel")
    reference_controlnet(1).save_pretrained(folder / "union")
    return str(write_demo_model(folder / "demo")), [str(write_controlnet(folder / "canny.safetensors")),
                                                     str(folder / "union")]


@pytest.fixture(scope="module")
def single(files):
    """The one-process pipeline over the same files."""
    return cases.load_pipeline(*files)


@pytest.fixture(scope="module")
def repo21(tmp_path_factory):
    """The tiny Qwen-Image 2.1 repository (the q21 cases)."""
    return str(tiny_repository21(tmp_path_factory))


@pytest.fixture(scope="module")
def single21(repo21):
    return cases.load_pipeline21(repo21)


@pytest.fixture(scope="module")
def repo_layered(tiny_repo, tmp_path_factory):
    """The tiny Qwen-Image-Layered repository (the layered cases)."""
    from tiny_layered import write_tiny_layered

    return str(write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo))


@pytest.fixture(scope="module")
def single_layered(repo_layered):
    return cases.load_layered(repo_layered)


@pytest.fixture(scope="module")
def single_fp8(files):
    """The one-process pipeline under FP8 compute (the fp8 cases)."""
    return cases.fp8_pipeline(*files)


@pytest.fixture(scope="module")
def two_ranks(files, repo21, repo_layered, tmp_path_factory):
    """Every two-rank case, then the killed rank: the launcher reports rank 1's death as the run's failure."""
    out = tmp_path_factory.mktemp("ranks2")
    with pytest.raises(ParallelError, match=r"rank 1 failed: Signal 9 \(SIGKILL\)"):
        launch(cases.run_cases, (*files, str(out), cases.TWO_RANKS, True, repo21, repo_layered), 2,
               threads_per_rank=1)
    return out


@pytest.fixture(scope="module")
def four_ranks(files, repo21, repo_layered, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks4")
    launch(cases.run_cases, (*files, str(out), cases.FOUR_RANKS, False, repo21, repo_layered), 4,
           threads_per_rank=1)
    return out


def _check(single, out, name, nprocs, request=None):
    if cases.CASES[name][1].get("qwen21"):
        single = request.getfixturevalue("single21")
    if cases.CASES[name][1].get("layered"):
        single = request.getfixturevalue("single_layered")
    if cases.CASES[name][1].get("fp8"):  # FP8 attention really runs (the reference form changes the result)
        single = request.getfixturevalue("single_fp8")
        assert rel_err(cases.generate(single, name), single(**cases.call_arguments(name))) > 1e-4
    overrides = {}
    if "seed" in cases.CASES[name][1]:  # seed=None: every rank used rank 0's seed; the reference draws with it
        seeds = {json.loads(_metadata(out, name, rank)["seed"]) for rank in range(nprocs)}
        assert len(seeds) == 1 and None not in seeds, seeds
        overrides["seed"] = seeds.pop()
    reference = cases.as_tensors(cases.generate(single, name, **overrides))
    ranks = [load_file(str(out / f"{name}.rank{rank}.safetensors")) for rank in range(nprocs)]
    for rank in range(nprocs):  # a step cache: the same steps computed, per branch, on every rank
        assert json.loads(_metadata(out, name, rank)["cache"]) == single.last_cache_report, name
        # Layered's caption of an empty prompt: written on rank 0, every rank holds the one-process caption
        assert json.loads(_metadata(out, name, rank)["caption"]) == single.last_request.extras.get("caption")
    if "cache" in cases.CASES[name][1]:  # the case's threshold really skips steps, branches apart on some
        assert any(len(steps) < cases.CACHED["num_inference_steps"] for steps in
                   single.last_cache_report["computed_steps"].values()), name
    if cases.CASES[name][1].get("prompt") == "":  # the caption step really ran
        assert single.last_request.extras["caption"], name
    if "pixels" in reference:  # rank 0 returns the image (its tiles summed in another order), the others None
        difference = (ranks[0]["pixels"].int() - reference["pixels"].int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3, name
        assert all("none" in rank for rank in ranks[1:])
        return
    latents, reference = ranks[0]["latents"], reference["latents"]
    assert latents.shape == reference.shape
    error = rel_err(latents, reference)
    assert error < TOLERANCE, f"{name}: {error:.2e}"
    for rank in ranks[1:]:
        assert torch.equal(rank["latents"], latents)  # every rank steps the same whole latents


def _metadata(out, name, rank) -> dict:
    from safetensors import safe_open

    with safe_open(str(out / f"{name}.rank{rank}.safetensors"), "pt") as file:
        return file.metadata()


@pytest.mark.parametrize("name", [name for name in cases.TWO_RANKS if name not in cases.REFUSED])
def test_two_ranks_equal_one_process(name, single, two_ranks, request):
    _check(single, two_ranks, name, 2, request)


@pytest.mark.parametrize("name", cases.FOUR_RANKS)
def test_four_ranks_equal_one_process(name, single, four_ranks, request):
    _check(single, four_ranks, name, 4, request)


def test_auto_lays_out_calls_with_and_without_guidance(two_ranks):
    """'auto' on two ranks of a two-head model: cfg=2 for a call with guidance, ulysses=2 for one without (no
    second branch to give a cfg group)."""
    from safetensors import safe_open

    for name, layout in (("auto_guidance", "cfg=2"), ("auto_no_guidance", "ulysses=2")):
        with safe_open(str(two_ranks / f"{name}.rank0.safetensors"), "pt") as file:
            assert file.metadata()["degrees"] == layout


def test_masks_in_compiled_blocks_are_refused_on_every_rank(two_ranks):
    """EliGen with compiled blocks under Ulysses: one ParallelConfigError on each rank, saying what to do."""
    from safetensors import safe_open

    for rank in range(2):
        with safe_open(str(two_ranks / f"compiled_eligen_ulysses2.rank{rank}.safetensors"), "pt") as file:
            metadata = file.metadata()
        assert metadata["error"] == "ParallelConfigError"
        assert "drop pipe.compile() or use cfg/data parallelism alone" in metadata["message"]


def test_a_dead_rank_ends_the_others_with_an_error(two_ranks):
    """Rank 1 ended mid-call (at step 1): rank 0 gets one ParallelError naming the failed step, within its 20 s
    timeout, instead of waiting forever."""
    outcome = json.loads((two_ranks / "killed.rank0.json").read_text())
    assert outcome["error"] == "ParallelError", outcome
    assert "rank 0:" in outcome["message"] and "with the other ranks failed" in outcome["message"]
    assert outcome["seconds"] < 20
    assert not (two_ranks / "killed.rank1.json").exists()


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_cli_parallel_png_equals_one_process(files, tmp_path, monkeypatch, capsys):
    """`qistudio generate --parallel ulysses=2 --device cpu` starts two gloo ranks itself; rank 0's PNG has the
    one-process PNG's pixels, and a bad degree is one error before anything loads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "qistudio").mkdir(parents=True)
    (tmp_path / "cache" / "qistudio" / "demo").symlink_to(files[0])
    common = ["generate", "a red fox", "--demo", "--size", "64x64", "--steps", "2", "--seed", "5", "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "one.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "two.png"), "--parallel", "ulysses=2"]) == 0
    assert np.array_equal(_pixels(tmp_path / "one.png"), _pixels(tmp_path / "two.png"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*common, "-o", str(tmp_path / "bad.png"), "--parallel", "ulysses=4"])
    assert "ulysses=4 does not divide the model's 2 attention heads" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_cli_parallel_qwen21_png_equals_one_process(repo21, tmp_path, capsys):
    """`qistudio generate --model <2.1 folder> --parallel ulysses=2 --device cpu`: rank 0's RGBA PNG has the
    one-process PNG's pixels; degrees it cannot run (ulysses=4 of the tiny model's 2 heads, beside ring=2, which
    2.1 runs) are one error before anything loads."""
    common = ["generate", "a red fox", "--model", repo21, "--size", "64x96", "--steps", "2", "--seed", "5",
              "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "one.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "two.png"), "--parallel", "ulysses=2"]) == 0
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert one.mode == two.mode == "RGBA" and np.array_equal(np.asarray(one), np.asarray(two))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*common, "-o", str(tmp_path / "bad.png"), "--parallel", "ring=2,ulysses=4"])
    assert "--parallel: ulysses=4 does not divide the model's 2 attention heads" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_cli_parallel_layered_pngs_equal_one_process(repo_layered, tmp_path, capsys):
    """`qistudio layers IMAGE --parallel ulysses=2 --device cpu` starts two gloo ranks through generate's launcher;
    rank 0 writes layer PNGs and a composite with the one-process pixels (RGBA). The ranks cannot see a test's
    shrunk working area, so this runs at 640 (896 x 448 here), one layer, one step. A bad degree is one error
    before anything loads."""
    image = tmp_path / "in.png"
    cases._rgba_image().save(image)
    common = ["layers", str(image), "--model", repo_layered, "--layers", "1", "--steps", "1", "--seed", "5",
              "--prompt", "a kite", "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    assert main([*common, "-o", str(tmp_path / "two"), "--parallel", "ulysses=2"]) == 0
    for name in ("layer-1.png", "composite.png"):
        with Image.open(tmp_path / "one" / name) as one, Image.open(tmp_path / "two" / name) as two:
            assert one.mode == two.mode == "RGBA", name
            # At this size the one-process GEMMs (the test process's threads) and the ranks' (one thread each) may
            # sum in another order: a level at most, on a few pixels (seen once in a whole-suite run).
            difference = np.abs(np.asarray(one).astype(int) - np.asarray(two).astype(int))
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-2, (name, difference.max())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*common, "-o", str(tmp_path / "bad"), "--parallel", "ulysses=4"])
    assert "ulysses=4 does not divide the model's 2 attention heads" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.png"))
