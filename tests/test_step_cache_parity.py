"""Step caching against its references on the same tiny random weights and noise: First-Block Cache and TaylorSeer
against diffusers 0.42.1's hooks on QwenImagePipeline, DBCache (with and without its TaylorSeer calibrator) and the
fixed schedule against cache-dit on the same diffusers pipeline. Each must compute and skip the same steps of each
guidance branch, and end on the same latents (1e-4 relative), with the branches batched (cfg_batch=True) or not.

The steps each side computed are read twice over: from the caches' own records (our report; cache-dit's cached-step
lists), and by watching a middle block run (a forward hook on its img_mod), which a skipped step never calls.
The thresholds sit between the measured residual changes of this tiny model with margins far above the 1e-6 by
which the two libraries' float32 arithmetic differs; the chosen ones make the branches disagree on some steps.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.caching import DBCache, FirstBlockCache, FixedSchedule, TaylorSeer
from qistudio.ops.packing import patchify, unpatchify
from tiny_models import reference_dit, reference_pipeline, save

H, W = 64, 96
LAYERS, MIDDLE = 6, 3  # block 3 lies in every method's skipped middle below
PROMPT, NEGATIVE = "a red fox in the snow, watercolour", "blurry, low quality, extra fingers on the hand"
QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")


@pytest.fixture(scope="module")
def six_blocks(tiny_repo, tmp_path_factory):
    """The tiny repository's text encoder and VAE with a 6-block DiT (enough for front, middle and back blocks)."""
    return save(reference_dit(num_layers=LAYERS), tmp_path_factory.mktemp("six_blocks") / "transformer")


def load_pipe(tiny_repo, transformer) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(transformer)), ModelConfig(path=str(tiny_repo / "text_encoder")),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )


@pytest.fixture(scope="module")
def pipe(tiny_repo, six_blocks):
    return load_pipe(tiny_repo, six_blocks)


@pytest.fixture
def ref(tiny_repo, six_blocks):
    """A fresh diffusers pipeline per test: the caches hook its transformer (and cache-dit its class)."""
    import diffusers

    return reference_pipeline(tiny_repo, transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(six_blocks))


def _noise():
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(7))


def run_reference(ref, steps: int, guidance: bool = True):
    """diffusers' latents (as ours: (1, 16, h, w)) and, per branch, the steps whose middle block ran."""
    transformer = ref.transformer
    calls, computed = [], []
    hooks = [transformer.img_in.register_forward_pre_hook(lambda m, a: calls.append(len(calls))),
             transformer.transformer_blocks[MIDDLE].img_mod.register_forward_pre_hook(
                 lambda m, a: computed.append(len(calls) - 1))]
    try:
        with torch.no_grad():
            latents = ref(prompt=PROMPT, negative_prompt=NEGATIVE if guidance else None,
                          true_cfg_scale=4.0 if guidance else 1.0, height=H, width=W, num_inference_steps=steps,
                          latents=patchify(_noise()), output_type="latent").images
    finally:
        for hook in hooks:
            hook.remove()
    branches = ("cond", "uncond") if guidance else ("cond",)
    steps_run = {name: [c // len(branches) for c in computed if c % len(branches) == k]
                 for k, name in enumerate(branches)}
    return unpatchify(latents, H // 16, W // 16), steps_run


def run_ours(pipe, cache, steps: int, cfg_batch: bool, guidance: bool = True):
    """Our latents, our record of computed steps per branch, and how many DiT calls ran the middle block."""
    middle_calls = []
    hook = pipe.dit.transformer_blocks[MIDDLE].img_mod.register_forward_pre_hook(
        lambda m, a: middle_calls.append(a[0].shape[0]))
    try:
        latents = pipe(PROMPT, negative_prompt=NEGATIVE if guidance else None, cfg_scale=4.0 if guidance else 1.0,
                       height=H, width=W, num_inference_steps=steps, noise=_noise(), cache=cache, cfg_batch=cfg_batch,
                       **QUIET)
    finally:
        hook.remove()
    return latents, pipe.last_cache_report["computed_steps"], len(middle_calls)


def check_against(reference, ours, cfg_batch: bool, steps: int):
    """Same steps computed per branch, the middle block run exactly where some branch computes, same latents."""
    expected, expected_steps = reference
    got, got_steps, middle_calls = ours
    assert got_steps == expected_steps
    assert all(len(s) < steps for s in got_steps.values())  # something was skipped
    if cfg_batch:
        assert middle_calls == len(set().union(*map(set, got_steps.values())))  # one batched call per such step
    else:
        assert middle_calls == sum(len(s) for s in got_steps.values())
    assert rel_err(got, expected) <= 1e-4


def with_cache_dit(ref, steps: int, calibrator=None, **config):
    """run_reference under cache-dit's DBCache; its own record of cached steps must agree with the watched block."""
    import cache_dit

    cache_dit.enable_cache(ref, cache_config=cache_dit.DBCacheConfig(enable_separate_cfg=True, **config),
                           calibrator_config=calibrator)
    try:
        result = run_reference(ref, steps)
        cached = {"cond": ref.transformer._cached_steps, "uncond": ref.transformer._cfg_cached_steps}
    finally:
        cache_dit.disable_cache(ref)  # it patches QwenImagePipeline.__call__ on the class
    for name, computed in result[1].items():
        assert computed == sorted(set(range(steps)) - set(cached[name]))
    return result


# First-Block Cache: block 0's residual changes by 0.56-0.96 between steps of this model; at 0.7 the nearest is
# 0.0036 away, and the branches disagree on steps 7 (cond 0.689 skips, uncond 0.704 computes) and 8.
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_first_block_cache_matches_diffusers(pipe, ref, cfg_batch):
    from diffusers.hooks import FirstBlockCacheConfig

    steps = 12
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.7))
    reference = run_reference(ref, steps)
    assert reference[1] == {"cond": [0, 1, 3, 5, 8, 9, 10, 11], "uncond": [0, 1, 3, 5, 7, 9, 10, 11]}
    check_against(reference, run_ours(pipe, FirstBlockCache(threshold=0.7), steps, cfg_batch), cfg_batch, steps)


def test_first_block_cache_without_guidance_matches_diffusers(pipe, ref):
    from diffusers.hooks import FirstBlockCacheConfig

    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.7))
    reference = run_reference(ref, 12, guidance=False)
    assert list(reference[1]) == ["cond"]
    check_against(reference, run_ours(pipe, FirstBlockCache(threshold=0.7), 12, True, guidance=False), True, 12)


# diffusers' lite TaylorSeer: the transformer's output extrapolated. Computed: calls 0, 1 (warm-up), 3, 6, 9
# ((k - 2 - 1) % 3 == 0) and 11 (disable_cache_after_step).
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_taylorseer_matches_diffusers_lite_mode(pipe, ref, cfg_batch):
    from diffusers.hooks import TaylorSeerCacheConfig

    steps = 12
    ref.transformer.enable_cache(TaylorSeerCacheConfig(
        cache_interval=3, disable_cache_before_step=2, disable_cache_after_step=11, max_order=2,
        taylor_factors_dtype=torch.float32, use_lite_mode=True))
    reference = run_reference(ref, steps)
    assert reference[1] == {"cond": [0, 1, 3, 6, 9, 11], "uncond": [0, 1, 3, 6, 9, 11]}
    ours = run_ours(pipe, TaylorSeer(order=2, cache_interval=3, warmup_steps=2, full_compute_from_step=11,
                                     factors_dtype="float32"), steps, cfg_batch)
    check_against(reference, ours, cfg_batch, steps)


def test_taylorseer_defaults_match_diffusers(pipe, ref):
    """diffusers' defaults (interval 5, 3 warm-up steps, order 1, bfloat16 factors): the same steps; the latents as
    close as bfloat16 factors allow (a rounding flipped by a 1e-6 difference moves a factor by 2^-8)."""
    from diffusers.hooks import TaylorSeerCacheConfig

    ref.transformer.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
    expected, expected_steps = run_reference(ref, 12)
    assert expected_steps["cond"] == [0, 1, 2, 4, 9]
    got, got_steps, _ = run_ours(pipe, TaylorSeer(), 12, cfg_batch=False)
    assert got_steps == expected_steps
    assert rel_err(got, expected) <= 1e-3


# DBCache (F2B1): the front residual changes by 0.63-0.92; at 0.69 the nearest is 0.0025 away and the branches
# disagree on steps 6-8 (max_continuous_cached_steps=2 forces cond to compute step 8). The second setting covers
# the warm-up interval (warm-up steps 0 and 2 only) and max_cached_steps.
DBCACHE_CASES = {
    "F2B1": dict(ours=dict(front_blocks=2, back_blocks=1, warmup_steps=2, residual_diff_threshold=0.69,
                           max_continuous_cached_steps=2),
                 ref=dict(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=2, residual_diff_threshold=0.69,
                          max_continuous_cached_steps=2),
                 steps={"cond": [0, 1, 3, 5, 8, 9, 10, 11], "uncond": [0, 1, 3, 5, 6, 7, 9, 10, 11]}),
    "F1B0-interval": dict(ours=dict(front_blocks=1, back_blocks=0, warmup_steps=4, warmup_interval=2,
                                    residual_diff_threshold=0.75, max_cached_steps=3),
                          ref=dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4, warmup_interval=2,
                                   residual_diff_threshold=0.75, max_cached_steps=3),
                          steps={"cond": [0, 1, 2, 3, 7, 8, 9, 10, 11], "uncond": [0, 1, 2, 3, 7, 8, 9, 10, 11]}),
}


@pytest.mark.parametrize("case, order, cfg_batch", [("F2B1", 0, True), ("F2B1", 0, False), ("F2B1", 2, True),
                                                    ("F2B1", 2, False), ("F1B0-interval", 1, True)])
def test_dbcache_matches_cache_dit(pipe, ref, case, order, cfg_batch):
    """order > 0: cache-dit's TaylorSeer calibrator extrapolates the cached residuals (both streams)."""
    import cache_dit

    steps, setting = 12, DBCACHE_CASES[case]
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    reference = with_cache_dit(ref, steps, calibrator, **setting["ref"])
    assert reference[1] == setting["steps"]
    ours = run_ours(pipe, DBCache(**setting["ours"], taylorseer_order=order), steps, cfg_batch)
    check_against(reference, ours, cfg_batch, steps)


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_fixed_schedule_matches_cache_dit_static_mask(pipe, ref, cfg_batch):
    steps = 10
    mask = [int(i % 3 == 0) for i in range(steps)]
    reference = with_cache_dit(ref, steps, Fn_compute_blocks=1, Bn_compute_blocks=1, steps_computation_mask=mask,
                               steps_computation_policy="static")
    assert reference[1] == {"cond": [0, 3, 6, 9], "uncond": [0, 3, 6, 9]}
    check_against(reference, run_ours(pipe, FixedSchedule(every=3, front_blocks=1, back_blocks=1), steps, cfg_batch),
                  cfg_batch, steps)
