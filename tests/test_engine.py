"""The engine's parts in this process: batch keys and selection, job specs, the batch runner against pipe(...)
alone, cancellation at the next step, LoRAs switched by scale, the LoRA catalog, job events.

The worker processes themselves (spawn, crash, restart, drain) are exercised through the real server in
tests/test_server.py.
"""

import io
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
from qistudio.engine.previews import LatentPreviewer
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


# --- Blockwise ControlNet, Qwen-Image-Layered and Qwen-Image 2.1 jobs -------------------------------------------

@pytest.fixture(scope="module")
def demo_family(tmp_path_factory):
    """The demo model with its tiny ControlNet and Layered model, as `--demo` serves them: a ModelSpec naming
    them and the pipeline a worker loads from it (with its Layered pipeline)."""
    from qistudio.cli.generate import _folder_configs
    from qistudio.demo import write_demo_model
    from qistudio.demo_family import write_demo_controlnet, write_demo_layered
    from qistudio.engine.models import LAYERED, ModelSpec, load_pipeline
    from qistudio.weights.model_config import ModelConfig

    demo = write_demo_model(tmp_path_factory.mktemp("xdg") / "demo")
    configs, tokenizer, processor = _folder_configs(demo)
    layered = write_demo_layered(demo)
    layered_configs = [ModelConfig(path=str(layered / "transformer")), configs[1],
                       ModelConfig(path=str(layered / "vae"))]
    layered_spec = ModelSpec.from_configs("layered", layered_configs, tokenizer, processor, family=LAYERED)
    spec = ModelSpec.from_configs("demo", configs, tokenizer, processor, dtype="float32",
                                  controlnets=[("canny", ModelConfig(path=str(write_demo_controlnet(demo))))],
                                  layered=layered_spec.replace(dtype="float32"))
    return spec, load_pipeline(spec, "cpu"), load_pipeline(spec.layered, "cpu")


@pytest.fixture
def family_runner(demo_family):
    spec, pipe, layered = demo_family
    parent, child = multiprocessing.Pipe()
    sent = Recorder()
    others = {"layered": (layered, LoRASlots(layered))}
    yield BatchRunner(pipe, "cpu", Control(child), sent, LoRASlots(pipe), LatentPreviewer.fit(pipe),
                      other_pipelines=others.get), sent
    parent.close()
    child.close()


def run_job(spec, model, runner, sent, job_id="j") -> list:
    """`spec` as the engine sends it: validated, through the wire, run as one task; its result images."""
    from qistudio.engine.spec import pipeline_of

    request = validate(spec, (), model)
    arguments = from_wire(to_wire(spec.arguments))
    runner.run([Task(job_id, arguments, spec.scheduler, [], {}, pipeline_of(request, model))])
    assert not sent.of("failed"), sent.of("failed")
    (result,) = [m for m in sent.of("result") if m["job"] == job_id]
    return result_images(result)


def test_a_control_job_is_pipe_with_its_controlnet_input(demo_family, family_runner):
    from qistudio import ControlNetInput

    model, pipe, _ = demo_family
    runner, sent = family_runner
    edges = Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 3).astype(np.uint8) * 255).convert("RGB")
    control = {"image": edges, "scale": 0.8, "start": 0.9, "end": 0.0, "controlnet": "canny"}
    spec = JobSpec({"prompt": "a house", "seed": 3, **SMALL, "blockwise_controlnet_inputs": [control]})
    (got,) = run_job(spec, model, runner, sent)
    assert spec.arguments["blockwise_controlnet_inputs"][0]["controlnet_id"] == 0
    expected = pipe("a house", seed=3, **SMALL, progress_bar_cmd=lambda s: s, blockwise_controlnet_inputs=[
        ControlNetInput(image=edges, scale=0.8, start=0.9, end=0.0, controlnet_id=0)])
    assert np.array_equal(pixels(got), pixels(expected))
    plain = pipe("a house", seed=3, **SMALL, progress_bar_cmd=lambda s: s)
    assert not np.array_equal(pixels(got), pixels(plain))  # the ControlNet steered it


@pytest.mark.parametrize("inputs, words", [
    ([{"image": "IMG", "controlnet": "depth"}], r"controlnet: 'depth' is not a ControlNet this server loads; give "
                                                r"one of canny"),
    ([{"image": "IMG", "controlnet": 3}], r"\[0\].controlnet: 3 is not"),
    ([{"image": "IMG", "strength": 1.0}], r"\[0\]: unknown field 'strength'"),
    ([{"image": "IMG", "scale": float("nan")}], r"\[0\].scale"),
    ([{"image": "IMG", "start": 0.2, "end": 0.5}], r"end <= start"),
    ([{"scale": 1.0}], r"\[0\] has no image"),
    ({"image": "IMG"}, r"must be a list"),
])
def test_control_inputs_are_checked_before_queueing(demo_family, inputs, words):
    model = demo_family[0]
    image = Image.new("RGB", (64, 64))
    inputs = [{k: image if v == "IMG" else v for k, v in item.items()} for item in inputs] if isinstance(
        inputs, list) else inputs
    with pytest.raises(InputError, match=words):
        validate(JobSpec({"prompt": "x", **SMALL, "blockwise_controlnet_inputs": inputs}), (), model)
    with pytest.raises(InputError, match="this server loads no ControlNet; start it with --controlnet"):
        validate(JobSpec({"prompt": "x", **SMALL, "blockwise_controlnet_inputs": [{"image": image}]}), (),
                 model.replace(controlnets=()))


def test_a_layers_job_is_pipe_on_the_layered_model(demo_family, family_runner, monkeypatch):
    from qistudio.conditioning import layered

    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})
    model, _, layered_pipe = demo_family
    runner, sent = family_runner
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA")
    spec = JobSpec({"prompt": "a cat", "image": picture, "layers": 2, "num_inference_steps": 2, "seed": 5})
    got = run_job(spec, model, runner, sent)
    expected = layered_pipe("a cat", image=picture, layers=2, num_inference_steps=2, seed=5,
                            progress_bar_cmd=lambda s: s)
    assert len(got) == 2 and all(image.mode == "RGBA" for image in got)
    for layer, want in zip(got, expected):
        assert np.array_equal(np.asarray(layer), np.asarray(want))
    assert sent.of("progress")[-1]["previews"]  # the composite frame previewed


def test_layers_jobs_go_where_a_layered_model_is(demo_family):
    from qistudio.engine.models import LAYERED
    from qistudio.engine.spec import LAYERED_PIPELINE, MAIN, pipeline_of

    model = demo_family[0]
    picture = Image.new("RGBA", (64, 64))
    layers = lambda: JobSpec({"prompt": "x", "image": picture, "layers": 2})  # noqa: E731
    assert pipeline_of(validate(layers(), (), model), model) == LAYERED_PIPELINE
    with pytest.raises(InputError, match="this server has no Qwen-Image-Layered model; start it with --layered-model"):
        validate(layers(), (), model.replace(layered=None))
    alone = model.layered
    assert pipeline_of(validate(layers(), (), alone), alone) == MAIN and alone.family == LAYERED
    with pytest.raises(InputError, match="this server's model is Qwen-Image-Layered: it splits an image"):
        validate(JobSpec({"prompt": "x", **SMALL}), (), alone)
    with pytest.raises(InputError, match="layers must be"):
        validate(JobSpec({"prompt": "x", "image": picture, "layers": 0}), (), model)


def test_a_qwen21_job_is_pipe_on_the_21_model(tmp_path_factory):
    """A 2.1 model served: its jobs are checked against 2.1's pipe(...), run alone, and equal it (RGBA)."""
    from tiny_qwen21 import model_configs21, tiny_repository21

    from qistudio.engine.models import QWEN21, ModelSpec, load_pipeline
    from qistudio.weights.model_config import ModelConfig

    repo = tiny_repository21(tmp_path_factory)
    model = ModelSpec.from_configs("2.1", model_configs21(repo), None, ModelConfig(path=str(repo / "processor")),
                                   dtype="float32", family=QWEN21)
    pipe = load_pipeline(model, "cpu")
    parent, child = multiprocessing.Pipe()
    sent = Recorder()
    previewer = LatentPreviewer.fit(pipe)  # 2.1's VAE: 64 channels, 16 pixels per latent pixel, RGBA
    assert previewer.weights.shape == (pipe.components.dit.config.in_channels, 3)
    runner = BatchRunner(pipe, "cpu", Control(child), sent, LoRASlots(pipe), previewer)
    reference = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    arguments = {"prompt": "a fox", "edit_image": [reference, reference.rotate(90)], "height": 64, "width": 96,
                 "num_inference_steps": 2, "seed": 4, "use_kv_cache": False}
    spec = JobSpec(dict(arguments))
    request = validate(spec, (), model)
    assert batch_key(request, "Qwen-Image", ()) is None
    (got,) = run_job(spec, model, runner, sent)
    expected = pipe(**arguments, progress_bar_cmd=lambda s: s)
    assert got.mode == "RGBA" and np.array_equal(np.asarray(got), np.asarray(expected))
    previews = [m["previews"]["j"] for m in sent.of("progress")]
    assert len(previews) == 2  # one per step, each a picture of the 6x4 latent grid
    assert all(Image.open(io.BytesIO(png)).size == (96 // 16, 64 // 16) for png in previews)
    for bad, words in ((dict(input_image=reference), "unknown argument 'input_image'; a Qwen-Image 2.1 job takes"),
                       (dict(edit_image=[reference] * 11), "1 to 10 images")):
        with pytest.raises(InputError, match=words):
            validate(JobSpec({"prompt": "x", **bad}), (), model)
    with pytest.raises(ValueError, match="served as a Qwen-Image model but its files are Qwen-Image 2.1's"):
        load_pipeline(model.replace(family="qwen-image"), "cpu")
    parent.close()
    child.close()
