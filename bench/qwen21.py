"""GPU benchmark: Qwen-Image 2.1, qistudio against diffusers 0.42.1 at its best (regional compile, its KV cache).

Random full-size weights (the released configuration: 32 single-stream blocks of 4096, 7B parameters, bf16; the
Qwen3-VL-8B text encoder; the 2.1 VAE), built once by the reference classes on the card and shared by assignment
with our modules, so both sides run identical weights with one copy in memory. Sections:

  forward   the DiT at each --sizes, text-to-image and with one condition image of the same size, a prompt of
            128 tokens. "step": one denoising step with the prefix (text, condition image) cached, what 39 of
            40 steps cost (diffusers kv_cache_mode="cached"; ours forward over the cache). "first step": the step
            that fills the cache (diffusers "extract": the whole joint sequence; ours prefill + step). Modes
            (--modes): eager; both compiled regionally (diffusers' compile_repeated_blocks, ours pipe.compile()'s
            compile_repeated_blocks: the target pass compiled, the prefill eager); ours compiled again on
            diffusers' kernels, the same-kernel rows that show what is ours: "sdpa" on its attention kernel
            (PyTorch's SDPA; diffusers' FlashAttention 4 backend downloads its kernel from the Hub, which a machine
            without network cannot), "same-kernel" on its attention and GEMM kernels; then ours with FP8 compute as
            pipe.enable_fp8_computation() sets it (W8A8 block linears, cuDNN's FP8 attention of the target pass
            where nvidia-cudnn-frontend runs), still compiled, against diffusers' compiled bf16 rows again.
            Errors: relative L2 of the target's velocity against diffusers' eager output.
  e2e       a whole image with one edit image at the first of --sizes: text encoding, VAE encode, --steps steps with
            the KV cache, VAE decode; diffusers' QwenImage21Pipeline (its transformer compiled if the forward section
            compiled it) against our pipeline in the forward section's last mode (its row says which), same noise;
            wall time, and the final latents' relative error.

--blocks N builds N of the released 32 blocks (shorter runs; the block is the same code, so the speed-ups hold per
block and the time of the full model is about 32/N times the rows'); the caption says so.

Timing (bench/timing.py): warm-up untimed (compilation included), then --runs interleaved rounds; median and min-max.
Writes $OUT/qwen21.md after every section (--report names it).

    python bench/qwen21.py [--sections forward e2e] [--sizes 1024 2048] [--cases t2i edit] [--runs 5]
    python bench/qwen21.py --scale tiny --compile-backend aot_eager --runs 1   # plumbing check on the CPU

On one H100 within about 8 minutes (most of it compiling: about ten block graphs for both sides; a warm
TORCHINDUCTOR_CACHE_DIR halves it), the issue's three targets (bf16 and FP8 forward against diffusers' compiled
forward, end to end with one edit image):

    python bench/qwen21.py --sizes 1024 --cases edit --runs 3 --steps 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pair import on_device, perturb, rel_err, share_weights  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.models.dit21 import QwenImage21DiT, dit21_config_from_shapes  # noqa: E402
from qistudio.models.layout21 import ImageBlock, JointLayout  # noqa: E402
from qistudio.weights.build import empty_parameters  # noqa: E402

PROMPT_HEAD = 8  # "<|im_start|>user\n<image1><|vision_start|>": the text before a condition image's slots


@dataclass(frozen=True)
class Scale21:
    name: str
    device: str
    dtype: torch.dtype
    sizes: tuple[int, ...]
    text_len: int
    latent_factor: int = 16
    dit: dict = field(default_factory=dict)  # QwenImage21Transformer2DModel arguments
    vae: dict = field(default_factory=dict)  # AutoencoderKLQwenImage21 arguments
    text: dict = field(default_factory=dict)  # Qwen3VLConfig overrides (text_config / vision_config)
    processor_size: dict | None = None


FULL = Scale21("full", "cuda", torch.bfloat16, (1024, 2048), 128,
               text=dict(text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                          rope_parameters={"rope_type": "default", "rope_theta": 5_000_000,
                                                           "mrope_interleaved": True, "mrope_section": [24, 20, 20]}),
                         vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                            out_hidden_size=4096, num_position_embeddings=2304,
                                            deepstack_visual_indexes=[8, 16, 24])))
TINY = Scale21("tiny", "cpu", torch.float32, (64, 96), 12,
               dit=dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
                        context_in_dim=64, axes_dims_rope=(8, 12, 12)),
               vae=dict(base_dim=8, decoder_base_dim=12, z_dim=16, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                        latents_mean=[0.1] * 16, latents_std=[1.5] * 16),
               text=dict(text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          rope_parameters={"rope_type": "default", "rope_theta": 5_000_000,
                                                           "mrope_interleaved": True, "mrope_section": [4, 2, 2]}),
                         vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                            out_hidden_size=64, num_position_embeddings=64,
                                            deepstack_visual_indexes=[0, 1])),
               processor_size={"shortest_edge": 1024, "longest_edge": 1 << 22})


def dit_pair(scale: Scale21):
    from diffusers import QwenImage21Transformer2DModel

    reference = on_device(lambda: QwenImage21Transformer2DModel(**scale.dit), scale)
    if scale.name == "tiny":
        perturb(reference)
    reference = reference.eval().requires_grad_(False)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with empty_parameters():
        ours = QwenImage21DiT(dit21_config_from_shapes(shapes, dict(reference.config)))
    return reference, share_weights(ours, reference)


def forward_inputs(scale: Scale21, size: int, edit: bool, channels: int, text_dim: int):
    """(layout, text states, condition tokens, target tokens, timestep, diffusers' keyword arguments)."""
    grid = size // scale.latent_factor
    block = ImageBlock(grid, grid)
    layout = JointLayout((PROMPT_HEAD, block, scale.text_len) if edit else (scale.text_len,), block)
    device, dtype = scale.device, scale.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(1, layout.num_text_tokens, text_dim, generator=g).to(device, dtype)
    condition = torch.randn(1, block.num_tokens, channels, generator=g).to(device, dtype) if edit else None
    target = torch.randn(1, block.num_tokens, channels, generator=g).to(device, dtype)
    timestep = torch.full((1,), 0.7, device=device)
    slots = [False] * PROMPT_HEAD + [True] * (block.num_tokens // 4) if edit else []
    slots += [False] * scale.text_len + [True] * (block.num_tokens // 4)
    states = [text[:, :PROMPT_HEAD], text.new_zeros(1, block.num_tokens // 4, text_dim), text[:, PROMPT_HEAD:]]
    reference_args = dict(
        hidden_states=target if condition is None else torch.cat([condition, target], dim=1),
        encoder_hidden_states=torch.cat(states, dim=1) if edit else text, timestep=timestep,
        img_shapes=[[(1, grid, grid)] * (2 if edit else 1)], img_mask=torch.tensor([slots], device=device),
        return_dict=False,
    )
    return layout, text, condition, target, timestep, reference_args


# Rows of ours compiled on diffusers' kernels (Bench.same_kernels), and their labels.
SAME_KERNEL_LABELS = {"sdpa": "compiled, ours on SDPA", "same-kernel": "compiled, ours on SDPA + cuBLAS"}


class Bench:
    def __init__(self, args, scale: Scale21):
        self.args, self.scale = args, scale
        self.tables: dict[str, str] = {}  # section -> its markdown table, in the order run
        self.load = None
        self.reference, self.ours = dit_pair(self.scale)
        self.ours_mode = "eager"  # what our DiT runs as now (the e2e row says it)

    def write(self) -> None:
        method = (f"median (min-max) of {self.args.runs} interleaved runs after {self.args.warmup} warm-up runs; "
                  "CUDA events (forward), the wall clock (end to end, one warm-up run)")
        blocks = self.reference.config.num_layers
        depth = (f"{blocks} block{'s' * (blocks != 1)}" if self.scale.name != "full" or blocks == 32 else
                 f"{blocks} of the released 32 blocks (--blocks: each time about {blocks}/32 of the full model's)")
        text = caption("Qwen-Image 2.1 (bench/qwen21.py): diffusers 0.42.1 against qistudio on shared random "
                       f"weights ({self.scale.name} scale, {depth})", method,
                       self.load.text() if self.load else None)
        write_report(self.args.report, text + "\n\n" + "\n\n".join(self.tables.values()), echo=False)

    def forward_rows(self, mode: str, expected: dict) -> list[list[str]]:
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        rows = []
        config = self.reference.config
        for size in self.scale.sizes:
            for edit in (case == "edit" for case in self.args.cases):
                layout, text, condition, target, timestep, ref_args = forward_inputs(
                    self.scale, size, edit, config.in_channels, config.context_in_dim)
                case = f"{size}x{size} {'edit' if edit else 't2i'}"
                num_target = layout.target.num_tokens
                with torch.no_grad():
                    warm = QwenImage21KVCache(config.num_layers)
                    self.reference(**ref_args, kv_cache=warm, kv_cache_mode="extract")
                    ours_cache = self.ours.prefill(text, condition, layout)
                    cases = {
                        "diffusers step": lambda: self.reference(**ref_args, kv_cache=warm, kv_cache_mode="cached"),
                        "ours step": lambda: self.ours(target, timestep, ours_cache),
                        "diffusers first step": lambda: self.reference(
                            **ref_args, kv_cache=QwenImage21KVCache(config.num_layers), kv_cache_mode="extract"),
                        "ours first step": lambda: self.ours(target, timestep,
                                                             self.ours.prefill(text, condition, layout)),
                    }
                    if mode == "eager":
                        expected[case] = self.reference(**ref_args)[0][:, -num_target:].float()
                    error = rel_err(self.ours(target, timestep, ours_cache).float(), expected[case])
                    timings = interleaved(cases, self.args.runs, self.args.warmup, device=self.scale.device)
                for what in ("step", "first step"):
                    theirs, ours = timings[f"diffusers {what}"], timings[f"ours {what}"]
                    rows.append([case, mode, what, theirs.text("ms", 1), ours.text("ms", 1),
                                 f"{theirs.median / ours.median:.2f}x", f"{error:.1e}"])
        return rows

    def forward(self) -> None:
        header = ["case", "mode", "what", "diffusers", "qistudio", "speed-up", "error"]
        rows, expected = [], {}
        modes = [m for m in self.args.modes if m != "fp8" or self.scale.device == "cuda"]  # W8A8 needs CUDA
        if "eager" not in modes:
            modes = ["eager", *modes]  # the errors' reference
        for mode in modes:
            label = mode
            if mode != "eager":
                self.compile()
            if mode == "fp8":  # ours only: the diffusers rows repeat its compiled bf16 run
                label = self.enable_fp8()
            with self.same_kernels(mode):
                rows += self.forward_rows(SAME_KERNEL_LABELS.get(mode, label), expected)
            self.tables["forward"] = markdown_table(header, rows)
            self.write()

    @contextmanager
    def same_kernels(self, mode: str):
        """Ours compiled on diffusers' kernels, to show what is ours: "sdpa" its attention (PyTorch's SDPA, where
        ours would take FlashAttention 4), "same-kernel" that and its GEMMs (cuBLAS, where ours would take quack's
        gated SwiGLU GEMM). Everything else (the KV-cache layout, the fused norm and RoPE kernels) stays ours."""
        if mode not in SAME_KERNEL_LABELS:
            yield
            return
        from qistudio.ops.attention import set_attention_backend
        from qistudio.ops.linear_swiglu import set_fused_swiglu

        set_attention_backend("sdpa")
        set_fused_swiglu(mode != "same-kernel")
        try:
            yield
        finally:
            set_attention_backend(None)
            set_fused_swiglu(True)

    def compile(self) -> None:
        """Both sides' regional compile (once)."""
        if self.ours_mode != "eager":
            return
        self.reference.compile_repeated_blocks(fullgraph=True, mode=self.args.compile_mode,
                                               backend=self.args.compile_backend)
        compile_repeated_blocks(self.ours, self.args.compile_mode, backend=self.args.compile_backend)
        self.ours_mode = "bf16 compiled"

    def enable_fp8(self) -> str:
        """Ours as pipe.enable_fp8_computation() sets it (memory/setup.py enable_fp8_compute); its row label."""
        from qistudio.memory.fp8_linear import dit_fp8_predicate, quantize_linears, set_fp8_compute
        from qistudio.ops.attention import available_backends, set_fp8_attention

        quantize_linears(self.ours, dit_fp8_predicate)
        set_fp8_compute(self.ours, True)
        set_fp8_attention(self.ours, True)
        attention = "cuDNN FP8 attention" if "cudnn_fp8" in available_backends() else "bf16 attention (no cuDNN FP8)"
        self.ours_mode = f"FP8 compiled (W8A8, {attention})"
        return f"fp8: W8A8 + {attention}"

    def e2e(self) -> None:
        from PIL import Image

        ours, reference = pipeline_pair(self.scale, self.reference, self.ours)
        from qistudio.conditioning.qwen21 import output_size

        size, steps = self.scale.sizes[0], self.args.steps
        image = Image.new("RGBA", (size * 3 // 4, size), (180, 40, 40, 255))  # a portrait edit image
        height, width = output_size(None, None, [image], size)  # the output takes its aspect
        factor = self.scale.latent_factor
        noise = torch.randn(1, self.reference.config.in_channels, height // factor, width // factor,
                            generator=torch.Generator().manual_seed(0)).to(self.scale.device, self.scale.dtype)
        ref_call = dict(prompt="a red vase on a table", image=[image], output_resolution=size, num_inference_steps=steps,
                        latents=noise.flatten(2).transpose(1, 2), use_kv_cache=True)
        our_call = dict(edit_image=[image], output_resolution=size, num_inference_steps=steps, noise=noise,
                        use_kv_cache=True, progress_bar_cmd=lambda x: x)
        with torch.no_grad():
            error = rel_err(ours("a red vase on a table", output_type="latent", **our_call).flatten(2).transpose(1, 2),
                            reference(**ref_call, output_type="latent").images)
        timings = interleaved({"diffusers": lambda: reference(**ref_call), "ours": lambda: ours(
            "a red vase on a table", **our_call)}, self.args.runs, 1, device=self.scale.device, wall=True)
        row = [f"{width}x{height}, 1 edit image, {steps} steps; ours {self.ours_mode}", timings["diffusers"].text(),
               timings["ours"].text(), f"{timings['ours'].median / timings['diffusers'].median:.2f}x", f"{error:.1e}"]
        self.tables["e2e"] = markdown_table(["end to end", "diffusers", "qistudio", "ours / diffusers",
                                             "latents error"], [row])
        self.write()


def pipeline_pair(scale: Scale21, transformer, dit: QwenImage21DiT):
    """(our QwenImage21Pipeline, diffusers' QwenImage21Pipeline) over one set of weights."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline
    from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qistudio.components import Components
    from qistudio.demo import SCHEDULER
    from qistudio.models.text_encoder21 import QwenImage21TextEncoder
    from qistudio.models.vae21 import QwenImage21VAE, VAE21Config
    from qistudio.pipeline21 import QwenImage21Pipeline as OurPipeline
    from qistudio.tokenizer_build21 import write_qwen3_vl_processor

    text_config = Qwen3VLConfig(**scale.text, tie_word_embeddings=False)
    text_config._attn_implementation = "sdpa"
    vae = on_device(lambda: AutoencoderKLQwenImage21(**scale.vae), scale, seed=1)
    text_encoder = on_device(lambda: Qwen3VLForConditionalGeneration(text_config), scale, seed=2)
    if scale.name == "tiny":
        perturb(vae, 0.02), perturb(text_encoder, 0.02)
    vae, text_encoder = vae.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)
    folder = Path(tempfile.mkdtemp(prefix="qwen21-processor-"))
    overrides = {"size": scale.processor_size} if scale.processor_size else {}
    processor = AutoProcessor.from_pretrained(write_qwen3_vl_processor(folder, **overrides))
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    reference = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                                    transformer=transformer)
    reference.set_progress_bar_config(disable=True)
    with empty_parameters():
        our_vae = QwenImage21VAE(VAE21Config.from_diffusers_config(dict(vae.config)))
    with torch.device("meta"):
        our_text = QwenImage21TextEncoder(text_config)
    our_text.model = text_encoder.model  # the same module: one copy
    components = Components(dit=dit, vae=share_weights(our_vae, vae), text_encoder=our_text.eval(),
                            processor=processor)
    return OurPipeline(components, scale.device, scale.dtype), reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="full", choices=["full", "tiny"])
    parser.add_argument("--sections", nargs="+", default=["forward", "e2e"], choices=["forward", "e2e"])
    parser.add_argument("--sizes", type=int, nargs="+", help="square sizes in pixels (default: 1024 2048 full)")
    parser.add_argument("--cases", nargs="+", default=["t2i", "edit"], choices=["t2i", "edit"],
                        help="forward: text-to-image, and/or with one condition image of the same size")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled", "sdpa", "same-kernel", "fp8"],
                        choices=["eager", "compiled", "sdpa", "same-kernel", "fp8"],
                        help="forward: the modes, in this order (sdpa, same-kernel: ours compiled on diffusers' "
                             "attention kernel, then on its attention and GEMM kernels)")
    parser.add_argument("--blocks", type=int, help="full scale: build this many of the 32 blocks (caption says so)")
    parser.add_argument("--steps", type=int, default=40, help="end to end: denoising steps")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for both sides")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager for a CPU plumbing check")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (median and min-max of these)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each row before the timed rounds")
    parser.add_argument("--report", default="qwen21.md", help="file name of the report under $OUT")
    args = parser.parse_args()
    scale = FULL if args.scale == "full" else TINY
    if args.sizes:
        scale = replace(scale, sizes=tuple(args.sizes))
    if args.blocks is not None:
        if args.blocks < 1:
            parser.error(f"--blocks must be at least 1, got {args.blocks}")
        scale = replace(scale, dit=dict(scale.dit, num_layers=args.blocks))
    bench = Bench(args, scale)
    with card_load() as load:
        bench.load = load
        for section in args.sections:
            getattr(bench, section)()
    bench.write()


if __name__ == "__main__":
    main()
