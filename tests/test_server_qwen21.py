"""`qistudio serve --model <a Qwen-Image 2.1 folder>` called through the official openai client: the engine picks
2.1's pipeline from the files, checks jobs against 2.1's arguments, and serves RGBA images equal to pipe(...)."""

import base64
import json
import os

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from qistudio import ModelConfig, QwenImagePipeline
from server_harness import ROOT, decoded, png_bytes, start_server_command, stop_server
from tiny_qwen21 import model_configs21, tiny_repository21


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repository21(tmp_path_factory)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg")), "PYTHONPATH": str(ROOT)}
    process, url = start_server_command(["serve", "--model", str(repo), "--workers", "1", "--threads", "1",
                                         "--device", "cpu"], env)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-checked", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def pipe(repo):
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=model_configs21(repo),
                                             tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(repo / "processor")))


def alone(pipe, prompt, **arguments):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs
    try:
        return pipe(prompt, num_inference_steps=2, progress_bar_cmd=lambda s: s, **arguments)
    finally:
        torch.set_num_threads(threads)


def assert_close(got: Image.Image, expected: Image.Image) -> None:
    assert got.mode == expected.mode == "RGBA" and got.size == expected.size
    diff = np.abs(np.asarray(got).astype(np.int16) - np.asarray(expected).astype(np.int16))
    assert diff.max() <= 1, diff.max()


def test_text_to_image_and_a_two_image_edit_equal_pipe(client, pipe, repo):
    (served,) = [m.model_dump() for m in client.models.list()]
    assert served["id"] == str(repo) and served["family"] == "qwen-image-2.1" and served["controlnets"] == []
    result = client.images.generate(prompt="a red fox", size="96x64", extra_body={"num_inference_steps": 2, "seed": 5})
    image = decoded(result.data[0])
    assert result.background == "transparent"
    assert_close(image, alone(pipe, "a red fox", height=64, width=96, seed=5))
    stored = json.loads(image.text["qistudio"])
    assert (stored["cfg"], stored["steps"], stored["seed"]) == (1.0, 2, 5)  # 2.1 samples without guidance

    first = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    second = first.rotate(90)
    edit = client.images.edit(image=[("a.png", png_bytes(first), "image/png"), ("b.png", png_bytes(second),
                                                                                "image/png")],
                              prompt="put them together", size="64x64",
                              extra_body={"num_inference_steps": 2, "seed": 6})
    assert_close(decoded(edit.data[0]), alone(pipe, "put them together", edit_image=[first, second], height=64,
                                              width=64, seed=6))


def test_20b_only_fields_are_refused_naming_them(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="64x64", extra_body={"entity_prompts": ["a"], "entity_masks": [
            base64.b64encode(png_bytes(Image.new("L", (64, 64), 255))).decode()]})
    assert "unknown argument 'eligen_entity_masks'; a Qwen-Image 2.1 job takes" in caught.value.body["message"]
