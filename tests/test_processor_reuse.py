"""A processor folder holding the tokenizer folder's tokenizer files takes the loaded tokenizer (one parse of the
vocabulary, not two) and encodes exactly as the processor transformers loads on its own; any difference in those
files and the processor keeps its own tokenizer."""

import json
import shutil

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from qistudio import ModelConfig
from qistudio.components import load_components
from qistudio.models.text_encoder import EDIT_TEMPLATE, T2I_TEMPLATE

PROMPTS = ["a kite over the sea", "一只橘猫坐在窗台上，水彩画风格。", "Ünïcödé 😀 <|image_pad|> 12345"]


def _load(tokenizer_folder, processor_folder):
    return load_components([], ModelConfig(path=str(tokenizer_folder)), ModelConfig(path=str(processor_folder)),
                           torch.float32, "cpu")


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 96), (56, 56))]


def _assert_same_encodings(processor, reference):
    for prompt in PROMPTS:
        for text in (prompt, T2I_TEMPLATE.format(prompt), EDIT_TEMPLATE.format(prompt)):
            assert processor.tokenizer(text).input_ids == reference.tokenizer(text).input_ids
    # The template holds one image; a second one in the prompt, as a two-image edit writes it.
    texts = [EDIT_TEMPLATE.format("<|vision_start|><|image_pad|><|vision_end|>" + p) for p in PROMPTS[:2]]
    ours = processor(text=texts, images=_images() * 2, padding=True, return_tensors="pt")
    theirs = reference(text=texts, images=_images() * 2, padding=True, return_tensors="pt")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_the_processor_reuses_the_tokenizer_and_encodes_as_its_own(tiny_repo):
    components = _load(tiny_repo / "tokenizer", tiny_repo / "processor")
    assert components.processor.tokenizer is components.tokenizer
    _assert_same_encodings(components.processor, AutoProcessor.from_pretrained(tiny_repo / "processor"))


def test_a_processor_with_other_tokenizer_settings_keeps_its_own(tiny_repo, tmp_path):
    processor_folder = shutil.copytree(tiny_repo / "processor", tmp_path / "processor")
    config_path = processor_folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 77  # one setting differs: not the same tokenizer
    config_path.write_text(json.dumps(config))
    components = _load(tiny_repo / "tokenizer", processor_folder)
    assert components.processor.tokenizer is not components.tokenizer
    assert components.processor.tokenizer.model_max_length == 77
    assert components.tokenizer.model_max_length != 77
    _assert_same_encodings(components.processor, AutoProcessor.from_pretrained(processor_folder))


def test_a_processor_with_an_extra_tokenizer_file_keeps_its_own(tiny_repo, tmp_path):
    processor_folder = shutil.copytree(tiny_repo / "processor", tmp_path / "processor")
    (processor_folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    components = _load(tiny_repo / "tokenizer", processor_folder)
    assert components.processor.tokenizer is not components.tokenizer
