"""The DiT: full-size layout, and parity with diffusers' QwenImageTransformer2DModel through our loader."""

import torch

from conftest import checkpoint_listing, rel_err
from qistudio.models.dit import dit_config_from_shapes
from qistudio.ops.packing import patchify
from qistudio.ops.rope import ImageGrid, qwen_rotary
from qistudio.weights.build import build_empty, load_model, match_checkpoint
from qistudio.weights.formats import DIT, detect_layout
from tiny_models import AXES, TEXT_DIM, reference_dit, save


class _ShapesOnly:
    """A TensorSource stand-in holding only names and shapes (the real listing of a checkpoint)."""

    def __init__(self, shapes):
        self.shapes, self.files = shapes, ["<listing>"]
        self.dtypes = dict.fromkeys(shapes, "BF16")  # as the released files store them
        self.file_of = {k: type("P", (), {"name": "<listing>"})() for k in shapes}

    def keys(self):
        return self.shapes.keys()


def test_full_size_layout_consumes_every_tensor():
    shapes = checkpoint_listing("qwen_image_transformer")
    layout = detect_layout(shapes)
    assert layout.kind == DIT
    cfg = dit_config_from_shapes(shapes)
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.head_dim, cfg.text_dim) == (60, 3072, 24, 128, 3584)
    assert cfg.axes_dim == (16, 56, 56) and cfg.mlp_hidden == 12288
    model = build_empty(DIT, shapes, None)
    assert all(p.device.type == "meta" for p in model.parameters())
    match = match_checkpoint(model, _ShapesOnly(shapes), layout)
    assert len(match.sources) == len(shapes) == 1933 and not match.ignored
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088


def _inputs(batch=2, h=6, w=10, text_len=7):
    tokens = patchify(torch.randn(batch, 16, 2 * h, 2 * w))
    text = torch.randn(batch, text_len, TEXT_DIM)
    return tokens, text


def test_parity_with_diffusers_through_loader(tmp_path):
    ref = reference_dit()
    # Sharded with an index, as the real checkpoint is.
    save(ref, tmp_path / "transformer", max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    files = sorted((tmp_path / "transformer").glob("*.safetensors"))
    assert len(files) > 1
    kind, ours = load_model(files, dtype=torch.float32)
    assert kind == DIT and ours.config.axes_dim == AXES

    h, w, lengths = 6, 10, [7, 4]  # non-square grid; two prompts of different lengths
    tokens, text = _inputs(h=h, w=w, text_len=7)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        expected = ref(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                       timestep=sigma, img_shapes=[[(1, h, w)]] * 2, return_dict=False)[0]
        got = ours(tokens, text, sigma, qwen_rotary([ImageGrid(0, h, w)], 7, axes_dim=AXES), text_lengths=lengths)
    assert rel_err(got, expected) <= 1e-4
    # Padding never changes a result: row 1 alone, unpadded, gives the same velocity.
    with torch.no_grad():
        alone = ours(tokens[1:], text[1:, :4], sigma[1:], qwen_rotary([ImageGrid(0, h, w)], 4, axes_dim=AXES))
    assert rel_err(alone, got[1:]) <= 1e-5


def test_comfyui_single_file_with_prefix(tmp_path):
    from safetensors.torch import save_file

    ref = reference_dit(num_layers=1)
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, tmp_path / "qwen_image_comfy.safetensors")
    _, ours = load_model([tmp_path / "qwen_image_comfy.safetensors"], dtype=torch.float32)
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref.state_dict()[name]), name


def test_float8_checkpoint_with_per_tensor_scales(tmp_path):
    from safetensors.torch import save_file

    ref = reference_dit(num_layers=1)
    state, expected = {}, {}
    for k, v in ref.state_dict().items():
        if v.ndim == 2:  # linear weights stored as float8 with a per-tensor scale, as ComfyUI's scaled fp8 does
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            state[k], state[k.removesuffix(".weight") + ".scale_weight"] = q, scale.reshape(1)
            expected[k] = q.float() * scale
        else:
            state[k], expected[k] = v.contiguous(), v
    state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(state, tmp_path / "fp8.safetensors")
    _, ours = load_model([tmp_path / "fp8.safetensors"], dtype=torch.float32)
    for name, p in ours.named_parameters():
        assert torch.allclose(p, expected[name], rtol=0, atol=1e-7), name
    assert rel_err(ours.transformer_blocks[0].attn.to_q.weight, ref.transformer_blocks[0].attn.to_q.weight) < 0.05


def test_condition_groups_and_zero_cond_t_match_diffusers():
    """Edit-style sequences: a target group then a condition group of another size at frame 1, with the condition
    tokens modulated by the t=0 embedding (Edit-2511's zero_cond_t)."""
    from qistudio.models.dit import DiTConfig, QwenImageDiT
    from qistudio.weights.build import empty_parameters

    ref, ref_zero = reference_dit(), reference_dit(zero_cond_t=True)  # same seed: same weights
    assert ref_zero.transformer_blocks[0].zero_cond_t
    with empty_parameters():
        ours = QwenImageDiT(DiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=TEXT_DIM, axes_dim=AXES))
    ours.load_state_dict(ref.state_dict(), assign=True)
    target, cond = ImageGrid(0, 4, 6), ImageGrid(1, 6, 4)
    tokens = torch.randn(2, target.num_tokens + cond.num_tokens, 64)
    text = torch.randn(2, 5, TEXT_DIM)
    sigma = torch.tensor([0.9, 0.4])
    rotary = qwen_rotary([target, cond], 5, axes_dim=AXES)
    is_condition = torch.arange(tokens.shape[1]) >= target.num_tokens
    shapes = [[(1, 4, 6), (1, 6, 4)]] * 2
    with torch.no_grad():
        for reference, mask in ((ref, None), (ref_zero, is_condition)):
            expected = reference(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma, img_shapes=shapes,
                                 return_dict=False)[0][:, : target.num_tokens]
            got = ours(tokens, text, sigma, rotary, num_target_tokens=target.num_tokens, condition_token_mask=mask)
            assert rel_err(got, expected) <= 1e-4


def test_compiled_rope_form_equals_the_complex_one():
    """Under torch.compile apply_rope switches to real arithmetic (fusable); both forms agree."""
    from qistudio.ops.rope import ImageGrid, apply_rope, apply_rotation, image_positions, rope_tables

    phasors = rope_tables(image_positions(ImageGrid(1, 3, 5)), (8, 12, 12))
    x = torch.randn(2, 15, 4, 32)  # head_dim 32 = 2 x 16 phasors
    rotation = torch.view_as_real(phasors)
    assert torch.allclose(apply_rotation(x, rotation[None]), apply_rope(x, phasors), atol=1e-6)
    compiled = torch.compile(apply_rotation, backend="eager", fullgraph=True)  # traced as under regional compile
    assert torch.allclose(compiled(x, rotation), apply_rope(x, phasors), atol=1e-6)
