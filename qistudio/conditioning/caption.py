"""A caption of an image written by the text encoder itself (Qwen2.5-VL): Qwen-Image-Layered's empty prompt.

Design note. diffusers' QwenImageLayeredPipeline writes the prompt when none is given ("", " " or None): the VL
model describes the input image, asked in English or in Chinese (`use_en_prompt`), through transformers'
generate() with the text encoder's own generation settings (its generation_config.json) and at most 512 new
tokens. Our text encoder is the bare Qwen2_5_VLModel: Qwen-Image reads hidden states, so the 1 GiB vocabulary
head (`lm_head.weight`) is not loaded with it. A caption reads that head from the same checkpoint files, wraps it
and the loaded model (shared, not copied) in transformers' Qwen2_5_VLForConditionalGeneration, and generates;
the head is freed afterwards. The two instructions are the reference's, byte for byte (line breaks included).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..validation import InputError

MAX_NEW_TOKENS = 512  # the reference's
CAPTION_PROMPT_EN = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# Image Annotator\n'
    'You are a professional\n'
    'image annotator. Please write an image caption based on the input image:\n'
    '1. Write the caption using natural,\n'
    'descriptive language without structured formats or rich text.\n'
    '2. Enrich caption details by including: \n'
    ' - Object\n'
    'attributes, such as quantity, color, shape, size, material, state, position, actions, and '
    'so on\n'
    ' - Vision Relations\n'
    'between objects, such as spatial relations, functional relations, possessive relations, '
    'attachment relations, action\n'
    'relations, comparative relations, causal relations, and so on\n'
    ' - Environmental details, such as weather, lighting,\n'
    'colors, textures, atmosphere, and so on\n'
    ' - Identify the text clearly visible in the image, without translation or\n'
    'explanation, and highlight it in the caption with quotation marks\n'
    '3. Maintain authenticity and accuracy:\n'
    ' - Avoid\n'
    'generalizations\n'
    ' - Describe all visible information in the image, while do not add information not '
    'explicitly shown in\n'
    'the image\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)
CAPTION_PROMPT_ZH = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# 图像标注器\n'
    '你是一个专业的图像标注器。请基于输入图像，撰写图注:\n'
    '1.\n'
    '使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n'
    '2. 通过加入以下内容，丰富图注细节：\n'
    ' - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n'
    ' -\n'
    '对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n'
    ' - 环境细节：例如天气、光照、颜色、纹理、气氛等\n'
    ' - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n'
    '3.\n'
    '保持真实性与准确性：\n'
    ' - 不要使用笼统的描述\n'
    ' -\n'
    '描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)


def caption_head(text_encoder: nn.Module, files: list[Path], dtype: torch.dtype, device) -> nn.Linear:
    """The vocabulary projection of the text encoder's checkpoint (tied to the embeddings if the config says so)."""
    from ..weights.build import read_weight
    from ..weights.safetensors_io import TensorSource

    config = text_encoder.model.config
    embeddings = text_encoder.model.get_input_embeddings().weight
    head = nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False, device="meta")
    source = TensorSource(files)
    try:
        if "lm_head.weight" in source.keys():
            weight = read_weight(source, "lm_head.weight", dtype, device)
        elif getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False):
            weight = embeddings.detach().to(device=device, dtype=dtype)
        else:
            raise InputError(f"the text encoder's files ({files[0].parent}) hold no lm_head.weight, which writing a "
                             "caption for an empty prompt needs; give a prompt that describes the image")
    finally:
        source.close()
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def generation_config(files: list[Path]):
    """The text encoder's generation_config.json beside its weights, else transformers' defaults (greedy)."""
    from transformers import GenerationConfig

    folder = files[0].parent
    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return None


def caption_image(text_encoder: nn.Module, processor, files: list[Path], image, use_en_prompt: bool,
                  device, dtype: torch.dtype) -> str:
    """The caption the text encoder writes for `image` (PIL), as diffusers' get_image_caption does."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = text_encoder.model.config
    with torch.device("meta"):
        generator = Qwen2_5_VLForConditionalGeneration(config)
    generator.model = text_encoder.model  # shared: the loaded weights, hooks and all
    generator.lm_head = caption_head(text_encoder, files, dtype, device)
    settings = generation_config(files)
    if settings is not None:
        generator.generation_config = settings
    instruction = CAPTION_PROMPT_EN if use_en_prompt else CAPTION_PROMPT_ZH
    inputs = processor(text=instruction, images=image, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        generated = generator.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    new_tokens = [out[len(ids):] for ids, out in zip(inputs["input_ids"], generated)]
    text = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return text.strip()
