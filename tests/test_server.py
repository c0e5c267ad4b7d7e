"""`qistudio serve --demo` as a real server on the loopback, called through the official openai client and httpx.

One server (two CPU worker processes) serves the whole module; the tests that kill workers and the one that
stops the server come last. Every image is compared with the same seeded request run alone through pipe(...) in
this process.
"""

import base64
import concurrent.futures
import io
import json
import os
import signal
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_files import peft_layout, random_pairs
from qistudio.cli.generate import STORED
from qistudio.demo import write_demo_model
from server_harness import (START_TIMEOUT, alone, assert_same_image, decoded, events, health, metric_samples, pixels,
                            png_bytes, post_job, start_server, stop_server, wait_job, wait_workers_idle)

SMALL = dict(size="64x64", extra_body={"num_inference_steps": 2})
MAX_QUEUE = 40


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("xdg")
    write_demo_model(home / "qistudio" / "demo")
    return home


@pytest.fixture(scope="module")
def lora_dir(demo_cache, reference):
    folder = demo_cache / "loras"
    folder.mkdir()
    save_file(peft_layout(random_pairs(reference.dit, seed=1)), str(folder / "style.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(demo_cache, lora_dir):
    process, url = start_server(demo_cache, "--workers", "2", "--threads", "1", "--max-queue", str(MAX_QUEUE),
                                "--max-steps", "5000", "--max-upload-mb", "2", "--lora-dir", str(lora_dir))
    yield process, url
    stop_server(process)


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def reference(demo_cache):
    """The demo pipeline in this process, as the workers load it."""
    from qistudio.cli.generate import _folder_configs
    from qistudio.pipeline import QwenImagePipeline

    configs, tokenizer, processor = _folder_configs(demo_cache / "qistudio" / "demo")
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             tokenizer_config=tokenizer, processor_config=processor)


# --- reading ------------------------------------------------------------------------------------------------------

def test_models_health_loras_and_metrics(client, url):
    assert [m.id for m in client.models.list()] == ["qistudio-demo"]
    report = health(url)
    assert report["status"] == "ok" and len(report["workers"]) == 2
    assert all(w["state"] == "idle" and w["pid"] and w["memory"]["host_resident"] > 0 for w in report["workers"])
    assert httpx.get(f"{url}/v1/loras").json()["data"] == [{"id": "style", "object": "lora"}]
    samples = metric_samples(url)
    for name in ("qistudio_queue_depth", "qistudio_images_total", "qistudio_steps_per_second",
                 "qistudio_images_per_second", "qistudio_step_seconds_count", "qistudio_job_seconds_count"):
        assert name in samples, name
    assert samples["qistudio_worker_up"] == {(("device", "cpu"), ("worker", "0")): 1.0,
                                             (("device", "cpu"), ("worker", "1")): 1.0}
    memory = samples["qistudio_worker_memory_bytes"]
    assert memory[(("device", "cpu"), ("kind", "host_resident"), ("worker", "0"))] > 0


# --- OpenAI's endpoints through the official client -----------------------------------------------------------------

def test_generate_n2_with_extra_fields_equals_pipe_and_records_parameters(client, reference):
    response = client.images.generate(
        model="qistudio-demo", prompt="a red fox in the snow", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2, "negative_prompt": "blurry", "cfg_scale": 3.0},
    )  # fmt: skip
    assert response.size == "64x64" and response.output_format == "png" and len(response.data) == 2
    images = [decoded(item) for item in response.data]
    expected = alone(reference, "a red fox in the snow", num_images=2, seed=5, negative_prompt="blurry", cfg_scale=3.0)
    for index, (got, want) in enumerate(zip(images, expected)):
        assert_same_image(got, want)
        stored = json.loads(got.text["qistudio"])
        assert set(STORED) <= set(stored) and {"device", "qistudio"} <= set(stored)
        assert (stored["prompt"], stored["negative"], stored["seed"], stored["steps"], stored["cfg"], stored["size"],
                stored["demo"], stored["dtype"], stored["num_images"], stored["image_index"]) == (
            "a red fox in the snow", "blurry", 5, 2, 3.0, "64x64", True, "float32", 2, index)


def test_no_seed_gives_a_recorded_random_seed(client, reference):
    response = client.images.generate(prompt="a boat", **SMALL)
    image = decoded(response.data[0])
    seed = json.loads(image.text["qistudio"])["seed"]
    assert isinstance(seed, int) and response.model_extra["seed"] == seed
    assert_same_image(image, alone(reference, "a boat", seed=seed)[0])


def test_lora_by_name_and_scale(client, reference, lora_dir):
    body = {"num_inference_steps": 2, "seed": 9, "loras": [{"name": "style", "scale": 0.7}]}
    image = decoded(client.images.generate(prompt="a tower", size="64x64", extra_body=body).data[0])
    reference.load_lora(reference.dit, str(lora_dir / "style.safetensors"), alpha=0.7)
    try:
        expected = alone(reference, "a tower", seed=9)[0]
    finally:
        reference.clear_lora()
    assert_same_image(image, expected)
    assert not np.array_equal(pixels(image), pixels(alone(reference, "a tower", seed=9)[0]))
    assert json.loads(image.text["qistudio"])["loras"] == [f"{(lora_dir / 'style.safetensors').resolve()}:0.7"]
    # The same LoRA given as {name: scale}, the other shape the openai client can send.
    again = client.images.generate(prompt="a tower", size="64x64",
                                   extra_body={**body, "loras": {"style": 0.7}}).data[0]
    assert_same_image(decoded(again), expected)


def test_edit_one_image_several_images_and_a_mask(client, reference):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    second = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    upload = lambda image, name="image.png": (name, png_bytes(image), "image/png")  # noqa: E731
    # Without the auto resize the VAE reads the 64x64 images as they are, not at about 1024x1024: fast on the CPU.
    body = {"num_inference_steps": 2, "seed": 3, "edit_image_auto_resize": False}
    small = dict(edit_image_auto_resize=False)

    one = client.images.edit(model="qistudio-demo", image=upload(source), prompt="add snow", size="64x64",
                             extra_body=body)
    assert_same_image(decoded(one.data[0]), alone(reference, "add snow", edit_image=source, seed=3, **small)[0])
    stored = json.loads(decoded(one.data[0]).text["qistudio"])
    assert stored["edit_images"] == ["(upload 1)"] and stored["prompt"] == "add snow"

    both = client.images.edit(image=[upload(source), upload(second, "b.png")], prompt="merge them", size="64x64",
                              n=2, extra_body=body)
    expected = alone(reference, "merge them", edit_image=[source, second], seed=3, num_images=2, **small)
    for got, want in zip(both.data, expected):
        assert_same_image(decoded(got), want)

    # OpenAI's mask: transparent = edit here. The pipeline's: white = repaint, with the first image kept elsewhere.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    repaint = Image.new("RGB", (64, 64), "black")
    repaint.paste((255, 255, 255), (16, 16, 48, 48))
    masked = client.images.edit(image=upload(source), mask=upload(mask, "mask.png"), prompt="a hole",
                                size="64x64", extra_body=body)
    want = alone(reference, "a hole", edit_image=source, input_image=source, inpaint_mask=repaint, seed=3,
                 **small)[0]
    assert_same_image(decoded(masked.data[0]), want)


def test_eligen_entities_with_masks_as_base64(client, reference):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    body = {"num_inference_steps": 2, "seed": 4, "entity_prompts": ["a red ball"],
            "entity_masks": [base64.b64encode(png_bytes(mask)).decode()]}
    image = decoded(client.images.generate(prompt="a beach", size="64x64", extra_body=body).data[0])
    expected = alone(reference, "a beach", seed=4, eligen_entity_prompts=["a red ball"], eligen_entity_masks=[mask])
    assert_same_image(image, expected[0])
    assert not np.array_equal(pixels(image), pixels(alone(reference, "a beach", seed=4)[0]))
    assert json.loads(image.text["qistudio"])["entities"] == ["a red ball"]


@pytest.fixture(scope="module")
def family_reference(demo_cache):
    """The demo pipeline with its tiny canny ControlNet, and the demo Layered pipeline, as the workers load them."""
    from qistudio import ModelConfig
    from qistudio.cli.generate import _folder_configs
    from qistudio.demo_family import write_demo_controlnet, write_demo_layered
    from qistudio.pipeline import QwenImagePipeline

    demo = demo_cache / "qistudio" / "demo"
    configs, tokenizer, processor = _folder_configs(demo)
    control = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer, processor_config=processor,
        model_configs=[*configs, ModelConfig(path=str(write_demo_controlnet(demo)))])
    layered = write_demo_layered(demo)
    layers = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer, processor_config=processor,
        model_configs=[ModelConfig(path=str(layered / "transformer")), configs[1],
                       ModelConfig(path=str(layered / "vae"))])
    return control, layers


def test_blockwise_controlnet_through_extra_body(client, url, family_reference):
    from qistudio import ControlNetInput

    edges = Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 3).astype(np.uint8) * 255).convert("RGB")
    (served,) = httpx.get(f"{url}/v1/models").json()["data"]
    assert served["controlnets"] == ["canny"] and served["layers"] is True and served["family"] == "qwen-image"
    control = {"image": base64.b64encode(png_bytes(edges)).decode(), "controlnet": "canny", "scale": 0.8,
               "start": 0.9, "end": 0.0}
    body = {"num_inference_steps": 2, "seed": 6, "controlnets": [control]}
    image = decoded(client.images.generate(prompt="a house", size="64x64", extra_body=body).data[0])
    expected = alone(family_reference[0], "a house", seed=6, blockwise_controlnet_inputs=[
        ControlNetInput(image=edges, scale=0.8, start=0.9, end=0.0, controlnet_id=0)])[0]
    assert_same_image(image, expected)
    assert not np.array_equal(pixels(image), pixels(alone(family_reference[0], "a house", seed=6)[0]))
    assert json.loads(image.text["qistudio"])["controls"] == ["canny:(upload 1):0.8"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a house", size="64x64", extra_body={
            "controlnets": [{**control, "controlnet": "depth"}]})
    assert caught.value.body["param"] == "controlnets" and "one of canny" in caught.value.body["message"]


def test_layers_through_edits_extra_body(client, family_reference):
    """An edit with `layers`: the picture split by the Layered model served beside the demo, n x layers RGBA PNGs."""
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA")
    result = client.images.edit(image=("cat.png", png_bytes(picture), "image/png"), prompt="a cat",
                                extra_body={"layers": 2, "num_inference_steps": 2, "seed": 5, "cfg_scale": 1.0})
    assert len(result.data) == 2 and result.background == "transparent"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = family_reference[1]("a cat", image=picture, layers=2, num_inference_steps=2, seed=5, cfg_scale=1.0,
                                        progress_bar_cmd=lambda s: s)
    finally:
        torch.set_num_threads(threads)
    for index, (item, want) in enumerate(zip(result.data, expected)):
        layer = decoded(item)
        assert layer.mode == "RGBA" and layer.size == want.size
        diff = np.abs(np.asarray(layer).astype(np.int16) - np.asarray(want).astype(np.int16))
        assert diff.max() <= 1, diff.max()
        stored = json.loads(layer.text["qistudio"])
        assert (stored["layers"], stored["layer"], stored["input_image"]) == (2, index + 1, "(upload)")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("cat.png", png_bytes(picture), "image/png"), prompt="", extra_body={"layers": 0})
    assert caught.value.body["param"] == "layers"


BAD_REQUESTS = [  # (keyword arguments of images.generate, exception, status, param, words in the message)
    (dict(size="65x64"), openai.BadRequestError, 400, "size", "multiples of 16"),
    (dict(size="4096x4096"), openai.BadRequestError, 400, "size", "at most"),
    (dict(size="big"), openai.BadRequestError, 400, "size", "WIDTHxHEIGHT"),
    (dict(n=100), openai.BadRequestError, 400, "n", "[1, 8]"),
    (dict(model="dall-e-3"), openai.NotFoundError, 404, "model", "not served here"),
    (dict(response_format="url"), openai.BadRequestError, 400, "response_format", "b64_json"),
    (dict(output_format="jpeg"), openai.BadRequestError, 400, "output_format", "png"),
    (dict(background="transparent"), openai.BadRequestError, 400, "background", "not supported"),
    (dict(extra_body={"stepz": 3}), openai.BadRequestError, 400, "stepz", "unknown parameter"),
    (dict(extra_body={"num_inference_steps": 0}), openai.BadRequestError, 400, "num_inference_steps", "[1, 5000]"),
    (dict(extra_body={"num_inference_steps": 6000}), openai.BadRequestError, 400, "num_inference_steps", "5000"),
    (dict(extra_body={"seed": -1}), openai.BadRequestError, 400, "seed", "[0, "),
    (dict(extra_body={"cfg_scale": "strong"}), openai.BadRequestError, 400, "cfg_scale", "number"),
    (dict(extra_body={"cfg_scale": 2, "true_cfg_scale": 3}), openai.BadRequestError, 400, "true_cfg_scale", "not both"),
    (dict(extra_body={"scheduler": "Euler"}), openai.BadRequestError, 400, "scheduler", "scheduler must be one of"),
    (dict(extra_body={"loras": [{"name": "nope"}]}), openai.BadRequestError, 400, None, "unknown LoRA 'nope'"),
    (dict(extra_body={"loras": [{"name": "style", "weight": 1}]}), openai.BadRequestError, 400, "loras[0]", "name"),
    (dict(extra_body={"loras": 5}), openai.BadRequestError, 400, "loras", "list"),
    (dict(extra_body={"entity_prompts": ["a", "b"], "entity_masks": []}), openai.BadRequestError, 400,
     "entity_masks", "at least one image"),
    (dict(extra_body={"image": "abc"}), openai.BadRequestError, 400, "image", "/v1/images/edits"),
    (dict(extra_body={"negative_prompt": 3}), openai.BadRequestError, 400, "negative_prompt", "string"),
]  # fmt: skip


@pytest.mark.parametrize("arguments, kind, status, param, words", BAD_REQUESTS,
                         ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_mistakes_are_openai_errors(client, arguments, kind, status, param, words):
    arguments = {"prompt": "x", "size": "64x64", **arguments}
    with pytest.raises(kind) as caught:
        client.images.generate(**arguments)
    error = caught.value
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["type"] == "invalid_request_error"
    assert error.body["param"] == param and words in error.body["message"], error.body


def test_edit_mistakes_are_openai_errors(client):
    good = ("a.png", png_bytes(Image.new("RGB", (64, 64), "red")), "image/png")
    cases = [
        (dict(image=("a.png", b"not an image", "image/png")), "image", "cannot read"),
        (dict(image=[good] * 9), "image", "at most 8"),
        (dict(image=good, mask=("m.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png")), "mask", "must match"),
        (dict(image=("big.png", png_bytes(Image.new("L", (4100, 4100))), "image/png")), "image", "pixels per image"),
    ]
    for arguments, param, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(prompt="x", size="64x64", **arguments)
        assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body


def test_raw_http_mistakes(url):
    post = lambda path, **kw: httpx.post(f"{url}{path}", timeout=30, **kw)  # noqa: E731
    cases = [
        (post("/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        (post("/v1/images/generations", json=["a list"]), 400, "JSON object"),
        (post("/v1/images/generations", json={"size": "64x64"}), 400, "prompt is required"),
        (post("/v1/images/generations", json={"prompt": "  "}), 400, "must not be empty"),
        (post("/v1/images/generations", content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"),
        (post("/v1/images/generations", content=b"x" * (3 * 2**20), headers={"content-type": "application/json"}),
         413, "exceeds"),
        (post("/v1/images/edits", data={"prompt": "x"}), 400, "image is required"),
        (httpx.get(f"{url}/v1/nowhere"), 404, "no route"),
        (httpx.get(f"{url}/v1/images/generations"), 405, "not allowed"),
        (httpx.get(f"{url}/v1/jobs/job-unknown"), 404, "no job"),
        (httpx.delete(f"{url}/v1/jobs/job-unknown"), 404, "no job"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"] and set(error) == {"message", "type", "param", "code"}, error


# --- load, queue, jobs, cancellation -------------------------------------------------------------------------------

def test_32_concurrent_requests_none_lost_each_equal_to_pipe(client, url, reference, capsys):
    count = 32
    prompts = [f"picture {i}: " + "a hill and a river " * (i % 5) for i in range(count)]

    def call(i):
        start = time.perf_counter()
        response = client.images.generate(prompt=prompts[i], size="64x64",
                                          extra_body={"seed": 1000 + i, "num_inference_steps": 2})
        return i, decoded(response.data[0]), time.perf_counter() - start

    batches_before = _batches(url)
    with concurrent.futures.ThreadPoolExecutor(count) as executor:
        futures = [executor.submit(call, i) for i in range(count)]
        done, pending = concurrent.futures.wait(futures, timeout=600)
    assert not pending, f"{len(pending)} requests did not finish"
    results = sorted(future.result() for future in done)
    assert [i for i, _, _ in results] == list(range(count))  # none lost
    latencies = np.array([seconds for _, _, seconds in results])
    with capsys.disabled():
        p50, p99 = np.percentile(latencies, [50, 99])
        print(f"\n{count} concurrent requests (64x64, 2 steps, 2 CPU workers): p50 {p50:.2f} s, p99 {p99:.2f} s")
    for i, image, _ in results:
        assert_same_image(image, alone(reference, prompts[i], seed=1000 + i)[0])
    batches = _batches(url)
    grew = {size: batches.get(size, 0) - batches_before.get(size, 0) for size in batches}
    assert sum(size * n for size, n in grew.items()) == count
    assert any(size > 1 and n for size, n in grew.items()), grew  # waiting requests were batched


def _batches(url) -> dict[int, int]:
    batches = metric_samples(url).get("qistudio_batches_total", {})
    return {int(dict(labels)["jobs"]): int(value) for labels, value in batches.items()}


def test_jobs_api_streams_progress_and_previews_then_cancels(url):
    job = post_job(url, prompt="a long one", num_inference_steps=4000, seed=1)
    assert job["object"] == "image.job" and job["status"] in ("queued", "running") and job["id"].startswith("job-")
    with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", timeout=120) as response:
        seen, kind, cancel_sent = [], None, False
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                seen.append((kind, event))
                if kind == "progress" and event["step"] >= 2 and not cancel_sent:
                    cancel_sent = True
                    cancelled = httpx.delete(f"{url}/v1/jobs/{job['id']}").json()
                    assert cancelled["cancel_requested"] and cancelled["id"] == job["id"]
    kinds = [k for k, _ in seen]
    assert kinds[0] == "queued" and "running" in kinds and kinds[-1] == "cancelled", kinds
    progress = [e for k, e in seen if k == "progress"]
    preview = Image.open(io.BytesIO(base64.b64decode(progress[0]["preview"])))
    assert preview.size == (8, 8) and progress[0]["total"] == 4000
    final = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["progress"]["step"] < 4000 and "result" not in final


def test_a_finished_job_keeps_its_result(url, reference):
    job = post_job(url, prompt="a kite", num_inference_steps=2, seed=12)
    final = wait_job(url, job["id"], lambda j: j["status"] == "succeeded")
    assert final["progress"] == {"step": 2, "total": 2}
    assert_same_image(decoded(final["result"]["data"][0]), alone(reference, "a kite", seed=12)[0])
    assert [e["event"] for e in events(url, job["id"])][-1] == "succeeded"


def test_full_queue_answers_429_with_retry_after(client, url):
    busy = [post_job(url, prompt=f"busy {i}", num_inference_steps=4000) for i in range(2)]
    for job in busy:
        wait_job(url, job["id"], lambda j: j["status"] == "running")
    waiting = [post_job(url, prompt=f"wait {i}", num_inference_steps=2) for i in range(MAX_QUEUE)]
    try:
        refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "one too many"}, timeout=30)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt="one too many", **SMALL)
        assert caught.value.status_code == 429 and "queue is full" in caught.value.body["message"]
        assert health(url)["queue"] == MAX_QUEUE
    finally:
        for job in waiting + busy:
            httpx.delete(f"{url}/v1/jobs/{job['id']}")
    for job in waiting:
        assert httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    for job in busy:
        wait_job(url, job["id"], lambda j: j["status"] == "cancelled", timeout=60)
    assert health(url)["queue"] == 0


def test_a_client_that_hangs_up_cancels_its_job(url):
    cancelled = lambda: metric_samples(url)["qistudio_jobs_total"][(("status", "cancelled"),)]  # noqa: E731
    before = cancelled()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/images/generations", timeout=3,
                   json={"prompt": "nobody waits", "size": "64x64", "num_inference_steps": 4000})
    deadline = time.monotonic() + 60
    while (health(url)["running"] or cancelled() == before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(url)["running"] == 0 and cancelled() == before + 1


# --- worker deaths and shutdown (last: they restart workers and stop the server) -----------------------------------

def _running_worker_pid(url, job_id) -> tuple[int, int]:
    job = wait_job(url, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    worker = job["worker"]
    return worker, health(url)["workers"][worker]["pid"]


def test_a_killed_worker_is_noticed_its_job_retried_and_it_restarts(url, reference):
    wait_workers_idle(url)
    job = post_job(url, prompt="survive", num_inference_steps=150, seed=21)
    worker, pid = _running_worker_pid(url, job["id"])
    os.kill(pid, signal.SIGKILL)
    final = wait_job(url, job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=START_TIMEOUT)
    assert final["status"] == "succeeded" and final["attempts"] == 2, final
    retried = [e for e in events(url, job["id"]) if e["event"] == "retrying"]
    assert len(retried) == 1 and "SIGKILL" in retried[0]["reason"] and "attempt 2 of 2" in retried[0]["reason"]
    expected = alone(reference, "survive", seed=21, num_inference_steps=150)[0]
    assert_same_image(decoded(final["result"]["data"][0]), expected)
    report = wait_workers_idle(url)  # the killed worker's slot has a new process
    slot = report["workers"][worker]
    assert slot["restarts"] == 1 and slot["pid"] != pid and report["status"] == "ok"
    assert metric_samples(url)["qistudio_worker_deaths_total"] == {(): 1.0}


def test_a_job_whose_workers_die_twice_fails_clearly_and_the_server_answers(client, url):
    job = post_job(url, prompt="doomed", num_inference_steps=4000)
    for _ in range(2):
        _, pid = _running_worker_pid(url, job["id"])
        os.kill(pid, signal.SIGKILL)
        wait_job(url, job["id"], lambda j: j["status"] != "running" or j["attempts"] == 2, timeout=60)
    final = wait_job(url, job["id"], lambda j: j["status"] == "failed", timeout=60)
    assert final["error"]["code"] == "worker_died" and final["attempts"] == 2
    assert "died" in final["error"]["message"] and "SIGKILL" in final["error"]["message"]
    assert health(url)["status"] == "ok"  # restarting workers still count; the server answers meanwhile
    report = wait_workers_idle(url)
    assert sum(w["restarts"] for w in report["workers"]) == 3
    assert client.images.generate(prompt="after", **SMALL).data


def test_shutdown_drains_the_running_job(server, url):
    process, _ = server
    job = post_job(url, prompt="drain me", num_inference_steps=60, seed=2)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        waiting = executor.submit(lambda: httpx.post(f"{url}/v1/images/generations", timeout=180, json={
            "prompt": "drain me too", "size": "64x64", "num_inference_steps": 60}))
        wait_job(url, job["id"], lambda j: j["status"] == "running")
        deadline = time.monotonic() + 60
        while health(url)["running"] < 2 and time.monotonic() < deadline:  # both jobs on a worker, none waiting
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        response = waiting.result(timeout=180)
    assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
    assert process.wait(120) == 0
