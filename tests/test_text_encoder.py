"""The text encoder: full-size layout (both naming schemes) and parity with transformers' Qwen2.5-VL."""

import torch
from safetensors.torch import save_file

from conftest import checkpoint_listing, rel_err
from qistudio.weights.build import build_empty, load_model, match_checkpoint
from qistudio.weights.formats import IGNORED, TEXT_ENCODER, detect_layout
from test_dit import _ShapesOnly
from tiny_models import reference_text_encoder, save


def test_full_size_layout_legacy_names():
    shapes = checkpoint_listing("qwen_image_text_encoder")
    layout = detect_layout(shapes)
    assert layout.kind == TEXT_ENCODER
    ours = {layout.key_map(k): s for k, s in shapes.items() if layout.key_map(k) != IGNORED}
    model = build_empty(TEXT_ENCODER, ours, None)
    cfg = model.model.config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.num_key_value_heads) == (
        3584, 28, 4)
    assert (cfg.vision_config.depth, cfg.vision_config.hidden_size, cfg.vision_config.num_heads) == (32, 1280, 16)
    match = match_checkpoint(model, _ShapesOnly(shapes), layout)
    # Every tensor is placed, except the lm_head, which is recognised and deliberately not loaded.
    assert match.ignored == ["lm_head.weight"] and shapes["lm_head.weight"] == (152064, 3584)
    assert len(match.sources) == len(shapes) - 1 == 728


def test_full_size_layout_current_transformers_names():
    legacy = checkpoint_listing("qwen_image_text_encoder")
    current = {}
    for k, s in legacy.items():
        if k.startswith("visual."):
            current["model." + k] = s
        elif k.startswith("model."):
            current["model.language_model." + k[6:]] = s
        else:
            current[k] = s
    layout = detect_layout(current)
    model = build_empty(TEXT_ENCODER, {k: s for k, s in current.items() if layout.key_map(k) != IGNORED}, None)
    assert len(match_checkpoint(model, _ShapesOnly(current), layout).sources) == 728


def _legacy_state(ref):
    state = {}
    for k, v in ref.state_dict().items():
        k = k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        state[k] = v.contiguous()
    return state


def test_parity_with_transformers(tmp_path):
    ref = reference_text_encoder(vocab_size=1000)
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    # As transformers 5 saves it (with config.json) ...
    folder = save(ref, tmp_path / "current")
    _, ours = load_model(sorted(folder.glob("*.safetensors")), dtype=torch.float32)
    with torch.no_grad():
        got = ours(ids, mask)
    assert rel_err(got[0], expected[0]) <= 1e-4 and rel_err(got[1, :5], expected[1, :5]) <= 1e-4

    # ... and under the on-disk names of the real checkpoint, sharded, with its config.json beside it (head sizes
    # cannot be read off the shapes; without a config.json the real model's 128/80 are assumed, see the layout test).
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    state = _legacy_state(ref)
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, legacy / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[len(keys) // 2:]}, legacy / "model-00002-of-00002.safetensors")
    kind, inferred = load_model(sorted(legacy.glob("*.safetensors")), dtype=torch.float32)
    cfg = inferred.model.config
    assert kind == TEXT_ENCODER and cfg.text_config.num_attention_heads == ref.config.text_config.num_attention_heads
    with torch.no_grad():
        got = inferred(ids, mask)
    assert rel_err(got[0], expected[0]) <= 1e-4
