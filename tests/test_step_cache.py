"""Step caching around the rest of the library: settings and their errors, the block gate, the low-VRAM streamer,
compile, edit images, EliGen, ControlNets, LoRA, and the command line's --cache with its PNG record."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from conftest import rel_err
from qistudio.caching import (PRESETS, DBCache, FirstBlockCache, FixedSchedule, TaylorSeer, parse_setting,
                              resolve_setting, setting_text)
from qistudio.validation import InputError
from test_step_cache_parity import LAYERS, load_pipe, pipe, six_blocks  # noqa: F401 (fixtures)

QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")
KWARGS = dict(negative_prompt="blurry", height=64, width=96, seed=3, **QUIET)


def middle_runs(pipe, index: int):
    """A list that gets the batch size of each call of block `index`."""
    calls = []
    handle = pipe.dit.transformer_blocks[index].img_mod.register_forward_pre_hook(
        lambda m, a: calls.append(a[0].shape[0]))
    return calls, handle


def test_presets_and_text_forms():
    for name, setting in PRESETS.items():
        assert parse_setting(name) == setting
        assert parse_setting(setting_text(setting)) == setting  # the PNG's full form reads back
    assert parse_setting("dbcache:front_blocks=1, residual_diff_threshold=0.12") == DBCache(
        front_blocks=1, residual_diff_threshold=0.12)
    assert parse_setting("taylorseer:full_compute_from_step=None,factors_dtype=float32") == TaylorSeer(
        factors_dtype="float32")
    assert resolve_setting(FirstBlockCache(0.1)) == FirstBlockCache(0.1) and resolve_setting(None) is None


@pytest.mark.parametrize("cache, message", [
    ("fastest", "unknown step cache 'fastest': give a preset"),
    ("dbcache:front=2", "expected FIELD=VALUE with FIELD one of front_blocks,"),
    ("dbcache:front_blocks=0", "DBCache.front_blocks must be an integer >= 1, got 0"),
    (DBCache(residual_diff_threshold=float("nan")), "DBCache.residual_diff_threshold must be a finite number"),
    (TaylorSeer(factors_dtype="int8"), "TaylorSeer.factors_dtype must be one of bfloat16, float16, float32"),
    (FixedSchedule(every=True), "FixedSchedule.every must be an integer >= 1, got True"),
    ({"threshold": 0.1}, "expected a preset name"),
    (DBCache(front_blocks=4, back_blocks=3), "front_blocks + back_blocks = 7 exceeds the DiT's 6 blocks"),
])
def test_bad_settings_are_one_error_before_the_dit_runs(pipe, cache, message):
    calls, handle = middle_runs(pipe, 0)
    try:
        with pytest.raises(InputError, match="cache.*" + re.escape(message)):
            pipe("x", cache=cache, num_inference_steps=2, **KWARGS)
    finally:
        handle.remove()
    assert calls == []


def test_streamed_blocks_skip_as_resident_ones(pipe):
    """With every block streaming from host memory (vram_limit=0), a cached call gives the resident result, and a
    skipped block's weights are not copied (only the block after the front ones, prefetched while they run)."""
    from qistudio.memory import offload

    cache = FixedSchedule(every=2, front_blocks=1, back_blocks=1)
    resident = pipe("a lighthouse", cache=cache, num_inference_steps=6, **KWARGS)
    copies = Counter()
    pipe.enable_vram_management(vram_limit=0)
    original = offload.BlockStreamer._launch

    def counting(self, rank):
        if rank not in self.pending and self.blocks is pipe.dit.transformer_blocks:
            copies[self.streamed[rank]] += 1
        return original(self, rank)

    try:
        offload.BlockStreamer._launch = counting
        streamed = pipe("a lighthouse", cache=cache, num_inference_steps=6, **KWARGS)
    finally:
        offload.BlockStreamer._launch = original
        pipe.disable_vram_management()
    assert torch.equal(streamed, resident)
    # 6 batched DiT calls, 3 of them full (steps 0, 2, 4): blocks 0 and 5 run in all (block 0 once more: the
    # last block prefetches it for a next call, as without a cache), blocks 2-4 in the full ones only. Block 1 is
    # copied in all: its copy starts while block 0 runs, before the gate has decided.
    assert [copies[i] for i in range(LAYERS)] == [7, 6, 3, 3, 3, 6]


def _feature_inputs(feature: str) -> dict:
    from PIL import Image

    if feature == "edit":
        return dict(prompt="make it blue", edit_image=Image.new("RGB", (48, 32), (200, 30, 30)),
                    edit_image_auto_resize=False)
    if feature == "eligen":
        left = Image.new("RGB", (96, 64))
        left.paste((255, 255, 255), (0, 0, 48, 64))
        return dict(prompt="a winter scene", eligen_entity_prompts=["a red fox", "a pine tree under the moon"],
                    eligen_entity_masks=[left, Image.new("RGB", (96, 64), (255, 255, 255))],
                    eligen_enable_on_negative=True)
    return dict(prompt="a lighthouse")


@pytest.fixture(scope="module")
def control_pipe(tiny_repo, tmp_path_factory):
    """The 2-block tiny DiT with a Blockwise ControlNet."""
    from qistudio import ModelConfig, QwenImagePipeline
    from test_control import write_controlnet

    net = write_controlnet(tmp_path_factory.mktemp("cache_controlnet") / "canny.safetensors")
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[*(ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")),
                       ModelConfig(path=str(net))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )


@pytest.mark.parametrize("cfg_batch", [True, False])
@pytest.mark.parametrize("feature", ["edit", "eligen", "controlnet"])
def test_features_through_the_gate(control_pipe, feature, cfg_batch):
    """Edit images, EliGen entities (masked attention) and a Blockwise ControlNet (a hook after each block): a
    cache that never skips (threshold 0) gives the plain latents; a fixed schedule skips the middle block (and so
    the ControlNet block after it) on the other steps, in both branches."""
    from qistudio import ControlNetInput
    from test_control import random_image

    inputs = _feature_inputs(feature)
    if feature == "controlnet":
        inputs["blockwise_controlnet_inputs"] = [ControlNetInput(image=random_image(1, (96, 64)), scale=1.0)]
    kwargs = dict(num_inference_steps=4, cfg_scale=3.0, cfg_batch=cfg_batch, **KWARGS, **inputs)
    plain = control_pipe(**kwargs)
    never = control_pipe(cache=DBCache(front_blocks=1, residual_diff_threshold=0), **kwargs)
    assert rel_err(never, plain) <= 1e-6
    assert control_pipe.last_cache_report["computed_steps"] == {"cond": [0, 1, 2, 3], "uncond": [0, 1, 2, 3]}
    dit_calls, handle = middle_runs(control_pipe, 1)
    control_calls = Counter()
    net_blocks = control_pipe.controlnets[0].controlnet_blocks
    handles = [handle] + [block.register_forward_pre_hook(lambda m, a, i=i: control_calls.update([i]))
                          for i, block in enumerate(net_blocks)]
    try:
        fixed = control_pipe(cache=FixedSchedule(every=2), **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert control_pipe.last_cache_report["computed_steps"] == {"cond": [0, 2], "uncond": [0, 2]}
    assert len(dit_calls) == (2 if cfg_batch else 4)  # block 1 runs on steps 0 and 2 only
    if feature == "controlnet":
        assert control_calls == {0: 4 if cfg_batch else 8, 1: len(dit_calls)}  # none after a skipped block
    assert torch.isfinite(fixed).all() and rel_err(fixed, plain) > 1e-4


def test_skipping_compiles_nothing_new(tiny_repo, six_blocks, pipe):  # noqa: F811
    """Compiled blocks (fullgraph): a call that skips blocks, or the whole DiT, adds no graph to those a plain call
    compiled, and gives the eager cached latents."""
    from torch._dynamo.utils import counters

    from qistudio.compile import compile_repeated_blocks

    # Graphs compiled by earlier tests for the same block code would serve some of this test's calls and not
    # others, so the count below would depend on test order: start from an empty Dynamo cache.
    torch._dynamo.reset()
    compiled = load_pipe(tiny_repo, six_blocks)
    compile_repeated_blocks(compiled.dit, backend="aot_eager")
    kwargs = dict(num_inference_steps=6, **KWARGS)
    compiled("a lighthouse", **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    for cache in (DBCache(front_blocks=2, back_blocks=1, warmup_steps=1, residual_diff_threshold=0.95),
                  FirstBlockCache(threshold=0.95), FixedSchedule(every=3, front_blocks=0), TaylorSeer(order=2)):
        got = compiled("a lighthouse", cache=cache, **kwargs)
        assert len(compiled.last_cache_report["computed_steps"]["cond"]) < 6
        assert rel_err(got, pipe("a lighthouse", cache=cache, **kwargs)) <= 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_lora_hooks_and_fused_lora_skip_alike(tiny_repo, six_blocks):
    """A LoRA on hooks (unfused) and the same LoRA fused into the weights: the same decisions and latents."""
    from lora_files import down_up_layout, random_pairs

    lora_pipe = load_pipe(tiny_repo, six_blocks)
    lora = down_up_layout(random_pairs(lora_pipe.dit, seed=3), prefix="diffusion_model.")
    cache = DBCache(front_blocks=2, back_blocks=1, warmup_steps=2, residual_diff_threshold=0.75)
    kwargs = dict(num_inference_steps=8, cache=cache, **KWARGS)
    plain = lora_pipe("a boat", **kwargs)
    lora_pipe.load_lora(lora_pipe.dit, state_dict=lora, name="detail")
    hooked, hooked_steps = lora_pipe("a boat", **kwargs), lora_pipe.last_cache_report
    lora_pipe.unload_lora()
    lora_pipe.load_lora(lora_pipe.dit, state_dict=lora, name="detail", fuse=True)
    fused, fused_steps = lora_pipe("a boat", **kwargs), lora_pipe.last_cache_report
    assert hooked_steps == fused_steps and len(hooked_steps["computed_steps"]["cond"]) < 8
    assert rel_err(hooked, fused) <= 1e-5 and rel_err(hooked, plain) > 1e-3


def test_cli_cache_flag_and_png_record(tiny_repo, tiny_pipe, tmp_path, capsys):
    """--cache takes a preset or a setting text; the PNG stores the full setting (read back by --from-png) and the
    steps computed per branch; a bad --cache is one argument error before anything loads."""
    import numpy as np
    from PIL import Image

    from qistudio.imageio import read_png_parameters
    from test_cli import cli

    out = tmp_path / "cached.png"
    assert cli("generate", "a small boat", "--model", tiny_repo, "--size", "64x48", "--steps", 4, "--seed", 3,
               "--cache", "compute-every-2", "-o", out) == 0
    expected = tiny_pipe("a small boat", seed=3, num_inference_steps=4, height=48, width=64, cache="compute-every-2")
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    params = read_png_parameters(out)
    assert params["cache"] == "fixed:every=2,front_blocks=1,back_blocks=0"
    assert params["cache_computed_steps"] == {"cond": [0, 2], "uncond": [0, 2]}
    again = tmp_path / "again.png"
    assert cli("generate", "--from-png", out, "-o", again) == 0
    assert read_png_parameters(again)["cache_computed_steps"] == params["cache_computed_steps"]
    assert cli("generate", "--from-png", out, "--cache", "first-block:threshold=0", "-o", again) == 0  # overrides
    assert read_png_parameters(again)["cache"] == "first-block:threshold=0"
    assert read_png_parameters(again)["cache_computed_steps"] == {"cond": [0, 1, 2, 3], "uncond": [0, 1, 2, 3]}
    capsys.readouterr()
    assert cli("generate", "x", "--model", tmp_path / "absent", "--cache", "dbcache:front_blocks=0",
               "-o", tmp_path / "bad.png") == 2
    err = capsys.readouterr().err
    assert "DBCache.front_blocks must be an integer >= 1, got 0" in err and "absent" not in err.split("error:")[-1]


def test_fp8_storage_skips_as_its_dequantised_weights_do(tiny_repo, six_blocks):
    """A DiT stored in FP8 makes the same decisions and latents as the same DiT holding its dequantised weights in
    the compute dtype (an FP8Linear is exactly a linear on those), for a schedule and for a threshold method."""
    from qistudio.memory.fp8_linear import FP8Linear, quantize_linears

    stored = load_pipe(tiny_repo, six_blocks)
    assert quantize_linears(stored.dit) > 0
    plain = load_pipe(tiny_repo, six_blocks)
    linears = dict(plain.dit.named_modules())
    with torch.no_grad():
        for name, module in stored.dit.named_modules():
            if isinstance(module, FP8Linear):
                linears[name].weight.copy_(module.dequantized_weight(linears[name].weight.dtype))
    for cache in (FixedSchedule(every=3), DBCache(front_blocks=2, back_blocks=1, warmup_steps=2,
                                                   residual_diff_threshold=0.75)):
        kwargs = dict(num_inference_steps=8, cache=cache, **KWARGS)
        from_fp8, fp8_report = stored("a harbour", **kwargs), stored.last_cache_report
        from_plain, plain_report = plain("a harbour", **kwargs), plain.last_cache_report
        assert fp8_report == plain_report and len(fp8_report["computed_steps"]["cond"]) < 8
        assert rel_err(from_fp8, from_plain) <= 1e-5
