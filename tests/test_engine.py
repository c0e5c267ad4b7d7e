"""The engine's parts in this process: batch keys and selection, job specs, the batch runner against pipe(...)
alone, cancellation at the next step, LoRAs switched by scale, the LoRA catalog, job events.

The worker processes themselves (spawn, crash, restart, drain) are exercised through the real server in
tests/test_server.py.
"""

import multiprocessing
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_files import peft_layout, random_pairs
from qistudio.engine.batching import Capacity, batch_key, select_batch
from qistudio.engine.jobs import Job, JobError, JobResult, JobState
from qistudio.engine.loras import LoRACatalog, LoRASlots
from qistudio.engine.runner import BatchRunner, Task
from qistudio.engine.spec import JobSpec, from_wire, to_wire, validate
from qistudio.engine.worker import Control
from qistudio.request import build_request
from qistudio.validation import InputError

SMALL = dict(height=64, width=64, num_inference_steps=2)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def assert_same_image(got, expected) -> None:
    """Equal as 8-bit images, up to batched GEMM rounding: no value more than one level off, almost none off."""
    diff = np.abs(pixels(got) - pixels(expected))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


# --- layout -----------------------------------------------------------------------------------------------------

def test_the_engine_knows_no_face_and_the_faces_no_model_code():
    """engine/ imports no face (cli, server); server/ reaches models only through the engine (and the CLI's PNG
    parameters), never the model, conditioning or sampling code itself."""
    from test_architecture import PACKAGE, _imports

    for path in (PACKAGE / "engine").glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(("qistudio.cli", "qistudio.server"))]
        assert not bad, f"{path.name} imports {bad}"
    for path in (PACKAGE / "server").glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(("qistudio.models", "qistudio.pipeline",
                                                          "qistudio.conditioning", "qistudio.sampling"))]
        assert not bad, f"{path.name} imports {bad}"


# --- batching ---------------------------------------------------------------------------------------------------

def test_batch_key_joins_only_requests_that_share_one_call():
    def key(scheduler="Qwen-Image", loras=(), **changes):
        return batch_key(build_request(**{"prompt": "a cat", **SMALL, **changes}), scheduler, loras)

    base = key()
    assert key(prompt="another prompt, longer than the first", seed=3, num_images=2) == base
    assert key(prompt=["two", "prompts"]) == base
    for different in (key(height=80), key(num_inference_steps=3), key(cfg_scale=2.0), key(negative_prompt="x"),
                      key(negative_prompt=None, cfg_scale=1.0), key(cfg_norm_rescale=False),
                      key(exponential_shift_mu=1.0), key(scheduler="Qwen-Image-Lightning"),
                      key(loras=(("style", 0.5),)), key(tiled=True)):
        assert different != base
    assert key(loras=(("a", 1.0), ("b", 0.5))) == key(loras=(("b", 0.5), ("a", 1.0)))
    image = Image.new("RGB", (64, 64), "gray")
    assert key(edit_image=image) is None
    assert key(input_image=image, denoising_strength=0.5) is None


def test_select_batch_takes_the_oldest_then_what_fits():
    requests = {name: build_request(**{"prompt": name, **SMALL, **extra}) for name, extra in
                [("a", {}), ("b", {"height": 128}), ("c", {"num_images": 3}), ("d", {}), ("e", {})]}
    waiting = list(requests)
    key = {name: batch_key(r, "Qwen-Image", ()) for name, r in requests.items()}
    pick = lambda capacity, jobs=waiting: select_batch(jobs, capacity, key.get, requests.get)  # noqa: E731
    assert pick(Capacity(8)) == ["a", "c", "d", "e"]  # b has another size; order kept
    assert pick(Capacity(4)) == ["a", "c"]  # 1 + 3 images
    assert pick(Capacity(2)) == ["a", "d"]  # c alone would pass 2 images
    assert pick(Capacity(1)) == ["a"]
    assert pick(Capacity(8), ["b", "a", "d"]) == ["b"]
    # A memory budget: each guided 64x64 image is 2 rows x 4096 pixels.
    assert pick(Capacity(8, free_bytes=2 * 4096 * 2, bytes_per_row_pixel=1.0)) == ["a", "d"]
    # The oldest always goes, even when it alone passes the budget.
    assert pick(Capacity(8, free_bytes=1, bytes_per_row_pixel=1.0)) == ["a"]
    assert pick(Capacity(8), []) == []


# --- job specs --------------------------------------------------------------------------------------------------

def test_validate_resolves_seed_and_size_and_names_bad_values():
    spec = JobSpec({"prompt": "a cat", "height": 64, "width": 64})
    request = validate(spec, known_loras=())
    assert isinstance(spec.arguments["seed"], int) and spec.arguments["seed"] == request.seed
    assert (spec.arguments["height"], spec.arguments["width"]) == (64, 64)
    cases = [
        (JobSpec({"prompt": "x", "callback": print}), "unknown argument 'callback'"),
        (JobSpec({"prompt": "x"}, scheduler="Euler"), "scheduler must be one of"),
        (JobSpec({"prompt": "x"}, loras=(("style", 1.0),)), "unknown LoRA 'style'; available: s"),
        (JobSpec({"prompt": "x"}, loras=(("s", 1.0), ("s", 2.0))), "a LoRA is named twice"),
        (JobSpec({"prompt": "x", "num_inference_steps": 0}), "num_inference_steps"),
    ]
    for bad, words in cases:
        with pytest.raises(InputError, match=words):
            validate(bad, known_loras={"s"})


def test_wire_carries_plain_values_and_images_only():
    image = Image.new("RGBA", (5, 3), (1, 2, 3, 4))
    value = {"prompt": ["a", "b"], "seed": 3, "cfg": 2.5, "flag": True, "none": None, "image": image,
             "rows": [[image]]}
    back = from_wire(to_wire(value))
    assert back["prompt"] == ["a", "b"] and back["seed"] == 3 and back["none"] is None
    assert back["image"].mode == "RGBA" and back["image"].tobytes() == image.tobytes()
    assert back["rows"][0][0].size == (5, 3)
    for bad in (torch.zeros(2), print, object()):
        with pytest.raises(TypeError, match="plain data"):
            to_wire({"x": bad})


# --- the batch runner on a real pipeline ------------------------------------------------------------------------

class Recorder:
    """The worker's outbound messages, as a list."""

    def __init__(self):
        self.messages = []

    def __call__(self, message):
        self.messages.append(message)

    def of(self, kind):
        return [m for m in self.messages if m["type"] == kind]


@pytest.fixture
def runner(tiny_pipe):
    parent, child = multiprocessing.Pipe()
    sent = Recorder()
    yield BatchRunner(tiny_pipe, "cpu", Control(child), sent, LoRASlots(tiny_pipe)), sent, parent
    tiny_pipe.clear_lora()
    parent.close()
    child.close()


def task(job_id, **arguments):
    return Task(job_id, {**SMALL, **arguments}, "Qwen-Image", [], {})


def result_images(message):
    return [Image.frombytes(mode, (w, h), data) for mode, w, h, data in message["images"]]


def test_batched_jobs_equal_each_job_run_alone(runner, tiny_pipe):
    run, sent, _ = runner
    jobs = [task("a", prompt="a red cat on a sofa", seed=1), task("b", prompt="b", seed=2, num_images=2),
            task("c", prompt="a much longer prompt about mountains, rivers and a sky full of birds", seed=3)]
    run.run(jobs)
    results = {m["job"]: result_images(m) for m in sent.of("result")}
    assert set(results) == {"a", "b", "c"} and not sent.of("failed")
    progress = sent.of("progress")
    assert [m["step"] for m in progress] == [1, 2] and progress[0]["total"] == 2 and progress[0]["images"] == 4
    for job in jobs:
        alone = tiny_pipe(**job.arguments, progress_bar_cmd=lambda steps: steps)
        alone = alone if isinstance(alone, list) else [alone]
        assert len(results[job.id]) == len(alone)
        for got, expected in zip(results[job.id], alone):
            assert_same_image(got, expected)


def test_a_batch_of_one_is_exactly_pipe(runner, tiny_pipe):
    run, sent, _ = runner
    arguments = dict(prompt="a lighthouse", seed=11, negative_prompt=None, cfg_scale=1.0)
    run.run([task("x", **arguments)])
    expected = tiny_pipe(**SMALL, **arguments, progress_bar_cmd=lambda steps: steps)
    assert np.array_equal(pixels(result_images(sent.of("result")[0])[0]), pixels(expected))


def test_cancel_stops_the_batch_at_the_next_step(runner):
    run, sent, engine_end = runner
    engine_end.send({"type": "cancel", "jobs": ["a"]})  # read by the first step's callback
    run.run([task("a", prompt="a", seed=1, num_inference_steps=5)])
    assert [m["job"] for m in sent.of("cancelled")] == ["a"]
    assert not sent.of("progress") and not sent.of("result")


def test_a_cancelled_job_in_a_batch_is_dropped_the_others_finish(runner):
    run, sent, engine_end = runner
    engine_end.send({"type": "cancel", "jobs": ["b"]})
    run.run([task("a", prompt="a", seed=1), task("b", prompt="b", seed=2)])
    assert [m["job"] for m in sent.of("cancelled")] == ["b"]
    assert [m["job"] for m in sent.of("result")] == ["a"]
    assert all(m["jobs"] == ["a"] for m in sent.of("progress"))


def test_a_bad_value_fails_its_jobs_as_the_callers_mistake(runner):
    run, sent, _ = runner
    run.run([Task("a", {**SMALL, "prompt": "x", "seed": -1}, "Qwen-Image", [], {})])
    (failed,) = sent.of("failed")
    assert failed["job"] == "a" and failed["user"] and "seed" in failed["error"]


# --- LoRAs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_folder(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(["style", "other", "third"]):
        save_file(peft_layout(random_pairs(tiny_pipe.dit, seed=seed)), str(folder / f"{name}.safetensors"))
    (folder / "sub").mkdir()
    save_file(peft_layout(random_pairs(tiny_pipe.dit, seed=5)), str(folder / "sub" / "adapter.safetensors"))
    save_file(peft_layout(random_pairs(tiny_pipe.dit, seed=6)), str(folder / ".hidden.safetensors"))
    return folder


def test_catalog_offers_names_found_under_its_folders_only(lora_folder, tmp_path):
    catalog = LoRACatalog([lora_folder])
    assert catalog.names() == ["other", "style", "sub", "sub/adapter", "third"]
    assert catalog.path("style") == (lora_folder / "style.safetensors").resolve()
    for outside in ("../style", str(lora_folder / "style.safetensors"), ".hidden", "missing", 3):
        assert outside not in catalog
    (lora_folder / "late.safetensors").write_bytes((lora_folder / "style.safetensors").read_bytes())
    assert "late" in catalog  # found by a rescan when first asked for
    (lora_folder / "late.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LoRACatalog([tmp_path / "nope"])


def test_lora_slots_switch_by_scale_and_leave_the_base_untouched(tiny_pipe, lora_folder):
    catalog = LoRACatalog([lora_folder])
    paths = {name: catalog.path(name) for name in catalog.names()}
    slots = LoRASlots(tiny_pipe, max_loaded=2)
    base_state = {k: v.clone() for k, v in tiny_pipe.dit.state_dict().items()}
    generate = lambda: pixels(tiny_pipe("a cat", seed=4, **SMALL, progress_bar_cmd=lambda s: s))  # noqa: E731
    try:
        base = generate()
        slots.activate([("style", 0.8)], paths)
        styled = generate()
        assert not np.array_equal(styled, base)
        slots.activate([("style", 0.3)], paths)
        assert not np.array_equal(generate(), styled)
        slots.activate([], paths)  # still loaded, at scale 0: the exact base image
        assert [info.name for info in tiny_pipe.list_loras()] == ["style"]
        assert np.array_equal(generate(), base)
        slots.activate([("other", 1.0)], paths)
        slots.activate([("third", 1.0)], paths)  # a third LoRA evicts the least recently used ("style")
        assert sorted(info.name for info in tiny_pipe.list_loras()) == ["other", "third"]
        slots.activate([("style", 0.8)], paths)
        assert np.array_equal(generate(), styled)  # reloaded on demand, same image
    finally:
        tiny_pipe.clear_lora()
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_pipe.dit.state_dict().items())


# --- jobs -------------------------------------------------------------------------------------------------------

def test_job_events_reach_subscribers_once_and_wait_returns():
    job = Job(JobSpec({"prompt": "x"}), build_request("x", **SMALL))
    seen = []
    past, unsubscribe = job.events_and_subscribe(seen.append)
    assert [e["type"] for e in past] == ["queued"]
    job.mark_running(worker=0, batch_size=1)
    for step in (1, 2):
        job.mark_progress(step, 2, None)
    assert not job.wait(0.01)
    waiter = threading.Thread(target=job.wait, args=(5,))
    waiter.start()
    job.finish(JobState.SUCCEEDED, JobResult([Image.new("RGB", (8, 8))], "cpu", "float32", 0.1))
    waiter.join(5)
    assert not waiter.is_alive() and job.done
    assert [e["type"] for e in seen] == ["running", "progress", "progress", "succeeded"]
    assert [e["type"] for e in job.history] == ["queued", "running", "progress", "succeeded"]  # latest progress only
    unsubscribe()
    job.finish(JobState.FAILED, error=JobError("late", "x"))
    assert len(seen) == 4
    assert job.summary()["error"] == {"message": "late", "code": "x"}
