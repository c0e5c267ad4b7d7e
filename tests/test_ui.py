"""The UI's parts without a browser: the layout guard, sizes, what a painted editor gives, form values -> the
engine's JobSpec, PNG records the CLI reads back, captions, the training command, the CLI's refusals, the UI
mounted beside the API, and a real engine followed, cancelled and swapped.

tests/test_ui_browser.py drives the whole UI in chromium.
"""

import csv
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from qistudio.engine import Engine, EngineConfig, EngineError, JobSpec, ModelSpec
from qistudio.engine.jobs import Job, JobResult, JobState
from qistudio.engine.spec import validate
from qistudio.ui import dataset, forms, masks, records, sizes, training
from qistudio.ui.context import EngineHolder, UIContext
from qistudio.validation import InputError

SMALL = forms.Settings(size=(64, 64), steps=2, seed=3)


def editor(size=(64, 64), *layers) -> dict:
    """A gr.ImageEditor value (type="pil"): a grey picture and stroke layers."""
    return {"background": Image.new("RGB", size, (128, 128, 128)), "layers": list(layers), "composite": None}


def layer(size=(64, 64), strokes=()) -> Image.Image:
    """An RGBA layer with filled boxes: ((left, top, right, bottom), (r, g, b, a)) each."""
    pixels = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    for (left, top, right, bottom), colour in strokes:
        pixels[top:bottom, left:right] = colour
    return Image.fromarray(pixels, "RGBA")


def white(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.convert("L")) > 127


# --- layout ----------------------------------------------------------------------------------------------------------

def test_ui_reaches_models_only_through_the_engine():
    """ui/ imports no model, conditioning, sampling or pipeline code (it submits JobSpecs); nothing outside ui/ and
    the CLI imports ui/ or gradio (the library runs without the ui extra)."""
    from test_architecture import PACKAGE, _imports

    for path in [*(PACKAGE / "ui").glob("*.py"), *(PACKAGE / "ui" / "tabs").glob("*.py")]:
        bad = [n for n in _imports(path) if n.startswith(("qistudio.models", "qistudio.pipeline",
                                                          "qistudio.conditioning", "qistudio.sampling"))]
        assert not bad, f"{path.name} imports {bad}"
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name in ("ui", "tabs", "cli"):
            continue
        bad = [n for n in _imports(path) if n.startswith(("qistudio.ui", "gradio"))]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


# --- sizes and masks -------------------------------------------------------------------------------------------------

def test_size_presets_are_the_published_ones_or_scaled_to_a_small_models_area():
    full = sizes.presets((1328, 1328))
    assert full["16:9 (1664x928)"] == (1664, 928) and full["1:1 (1328x1328)"] == (1328, 1328)
    demo = sizes.presets((256, 256))
    for label, (width, height) in demo.items():
        ratio = label.split()[0].split(":")
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width / height - int(ratio[0]) / int(ratio[1])) < 0.1, label
        assert 0.8 < width * height / 256**2 < 1.2, label
    assert sizes.chosen_size("1:1 (256x256)", 0, 0, demo) == (256, 256)
    assert sizes.chosen_size(sizes.FREE, 96, 48, demo) == (96, 48)
    assert sizes.chosen_size(sizes.FOLLOW_INPUT, 96, 48, demo) is None
    assert sizes.rounded(65, 64) == (80, 64) and sizes.at_area((128, 64), 64 * 64) == (96, 48)


def test_the_painted_area_is_the_mask_without_the_soft_rim():
    strokes = layer(strokes=[((10, 20, 50, 30), (255, 255, 255, 255)), ((10, 30, 50, 32), (255, 255, 255, 60))])
    mask = masks.mask_image(editor((64, 64), strokes))
    assert mask.mode == "RGB" and mask.size == (64, 64)
    rows, cols = np.nonzero(white(mask))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 29, 10, 49)  # the alpha-60 rim is not painted
    assert masks.mask_image(editor()) is None and masks.mask_image(None) is None
    # A layer of another size (the editor's canvas) is read at the picture's size.
    big = layer((128, 128), [((0, 0, 64, 64), (255, 255, 255, 255))])
    assert white(masks.mask_image(editor((64, 64), big)))[:32, :32].all()


def test_regions_by_nearest_palette_colour_later_layers_on_top():
    red, green = masks.PALETTE[0][1], masks.PALETTE[1][1]
    rgb = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in (red, green)]
    near_red = tuple(max(0, c - 6) for c in rgb[0])  # blending nudges a colour; the nearest palette colour wins
    first = layer(strokes=[((0, 0, 32, 32), (*near_red, 255)), ((32, 32, 64, 64), (*rgb[1], 255))])
    second = layer(strokes=[((16, 16, 48, 48), (*rgb[1], 200))])  # green painted over part of red
    regions = masks.regions(editor((64, 64), first, second))
    assert list(regions) == ["red", "green"]
    assert white(regions["red"]).sum() == 32 * 32 - 16 * 16
    assert white(regions["green"])[16:48, 16:48].all() and white(regions["green"])[32:, 32:].all()
    assert not (white(regions["red"]) & white(regions["green"])).any()


def test_background_flattens_transparency_on_white():
    picture = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert masks.background({"background": picture}).getpixel((0, 0)) == (255, 255, 255)
    assert masks.with_background(None) is None and masks.blank_canvas(32, 16)["background"].size == (32, 16)


# --- forms -> the engine's request -----------------------------------------------------------------------------------

def test_generation_is_the_pipe_arguments_the_engine_validates():
    spec = forms.generation("a cat", forms.Settings(negative_prompt="blurry", size=(96, 64), steps=3, cfg_scale=2.5,
                                                    seed=11, num_images=2, scheduler="Qwen-Image-Lightning"),
                            [["style", 0.5], ["", None]])
    assert spec.arguments == {"prompt": "a cat", "negative_prompt": "blurry", "cfg_scale": 2.5,
                              "num_inference_steps": 3, "num_images": 2, "width": 96, "height": 64, "seed": 11}
    assert (spec.scheduler, spec.loras) == ("Qwen-Image-Lightning", (("style", 0.5),))
    request = validate(spec, {"style"})
    assert (request.width, request.height, request.seed, request.batch_size) == (96, 64, 11, 2)
    random_seed = forms.generation("a cat", forms.Settings(size=(64, 64)))
    validate(random_seed, ())
    assert isinstance(random_seed.arguments["seed"], int)  # the engine chose it, and it is recorded


def test_feature_forms_build_their_requests():
    picture = Image.new("RGB", (60, 40), (10, 20, 30))
    one = forms.edit("make it red", SMALL, [picture, None, None])
    assert one.arguments["edit_image"] is not None and not isinstance(one.arguments["edit_image"], list)
    several = forms.edit("combine", forms.Settings(steps=2), [picture, picture], lowres_fix=True, area=64 * 64)
    assert len(several.arguments["edit_image"]) == 2
    assert (several.arguments["width"], several.arguments["height"]) == (80, 48)  # the last image's aspect
    assert several.arguments["edit_rope_interpolation"] and not several.arguments["edit_image_auto_resize"]
    assert isinstance(forms.edit("x", SMALL, [picture], picture_template=True).arguments["edit_image"], list)
    validate(several, ())

    painted = editor((60, 40), layer((60, 40), [((0, 0, 30, 20), (255, 255, 255, 255))]))
    inpaint = forms.inpaint("a dog", forms.Settings(steps=2), painted, 0.6)
    assert (inpaint.arguments["width"], inpaint.arguments["height"]) == (64, 48)  # the picture's size, rounded up
    assert inpaint.arguments["denoising_strength"] == 0.6 and white(inpaint.arguments["inpaint_mask"]).sum() == 600
    assert "inpaint_mask" not in forms.inpaint("redraw", SMALL, editor((60, 40)), 0.5).arguments  # image-to-image
    validate(inpaint, ())

    regions = editor((64, 64), layer(strokes=[((0, 0, 20, 20), (*bytes.fromhex(masks.PALETTE[2][1][1:]), 255))]))
    eligen = forms.eligen("a room", SMALL, regions, {"blue": "a lamp", "red": ""}, on_negative=True)
    assert eligen.arguments["eligen_entity_prompts"] == ["a lamp"] and eligen.arguments["eligen_enable_on_negative"]
    validate(eligen, ())

    context = forms.in_context("a house", SMALL, picture)
    assert context.arguments["context_image"].size == (60, 40)

    served = ModelSpec("demo", (), controlnets=(("depth", {}), ("canny", {})), layered=ModelSpec("layered", ()))
    control = forms.blockwise("a house", SMALL, picture, "canny", 0.7, 0.9, 0.1)
    validate(control, (), served)
    (item,) = control.arguments["blockwise_controlnet_inputs"]
    assert (item["controlnet_id"], item["scale"], item["start"], item["end"]) == (1, 0.7, 0.9, 0.1)
    with pytest.raises(InputError, match=r"\[0\]: the inpaint ControlNet needs an inpaint_mask"):
        validate(forms.blockwise("x", SMALL, picture, "inpaint", 1.0, 1.0, 0.0), (), served.replace(
            controlnets=(("inpaint", {}),)))
    repaint = forms.blockwise("x", SMALL, picture, "inpaint", 1.0, 1.0, 0.0, inpaint_mask=Image.new("L", (60, 40)))
    assert validate(repaint, (), served.replace(controlnets=(("inpaint", {}),))).controlnet_inputs[0].inpaint_mask
    split = forms.layers("", forms.Settings(steps=2, seed=3), picture, 3, 1024, english=True)
    assert split.arguments["image"].mode == "RGBA" and "width" not in split.arguments
    assert (split.arguments["layers"], split.arguments["resolution"], split.arguments["use_en_prompt"]) == (3, 1024, True)
    validate(split, (), served)


@pytest.mark.parametrize("build, words", [
    (lambda: forms.generation("  ", SMALL), "prompt"),
    (lambda: forms.edit("x", SMALL, [None, None]), "at least one image"),
    (lambda: forms.inpaint("x", SMALL, None, 0.5), "upload the image"),
    (lambda: forms.eligen("x", SMALL, editor(), {"red": "an apple"}), "red entity has a prompt but no region"),
    (lambda: forms.eligen("x", SMALL, editor((64, 64), layer(strokes=[((0, 0, 9, 9), (230, 25, 75, 255))])), {}),
     "red region has no prompt"),
    (lambda: forms.eligen("x", SMALL, editor(), {}), "paint at least one region"),
    (lambda: forms.in_context("x", SMALL, None), "control map"),
    (lambda: forms.blockwise("x", SMALL, None, "canny", 1.0, 1.0, 0.0), "control map"),
    (lambda: forms.layers("x", SMALL, None, 4, 640), "upload the picture"),
    (lambda: forms.generation("x", SMALL, [["style", "loud"]]), "scale must be a number"),
])
def test_form_mistakes_are_one_message_naming_them(build, words):
    with pytest.raises(InputError, match=words):
        build()


# --- records ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def context(tmp_path):
    """A UIContext over an engine that is configured, not started (records and forms need its catalog only)."""
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"")
    spec = ModelSpec("qistudio-demo", (), extra={"demo": True, "model": None})
    engine = Engine(EngineConfig(model=spec, lora_dirs=(str(loras),)))
    return UIContext(EngineHolder(engine), tmp_path / "out")


def finished(spec: JobSpec, images, loras=("style",)) -> Job:
    """A job as the engine leaves it after its worker sent the images."""
    job = Job(spec, validate(spec, set(loras)))
    job.finish(JobState.SUCCEEDED, JobResult(images, "cpu", "float32", 0.5))
    return job


def test_results_carry_the_clis_parameters_and_their_inputs(context):
    from qistudio.cli.generate import resolve_settings
    from qistudio.cli.main import build_parser

    painted = editor((64, 64), layer(strokes=[((0, 0, 64, 16), (*bytes.fromhex(masks.PALETTE[0][1][1:]), 255))]))
    spec = forms.eligen("a room", SMALL, painted, {"red": "a lamp"}, loras=[["style", 0.7]])
    images = [Image.new("RGB", (64, 64), (k * 40, 0, 0)) for k in range(2)]
    paths = records.save_results(finished(spec, images), context)
    assert [p.parent for p in paths] == [context.images_dir] * 2
    stored = records.read_parameters(paths[1])
    assert (stored["prompt"], stored["seed"], stored["steps"], stored["size"], stored["image_index"]) == (
        "a room", 3, 2, "64x64", 1)
    assert stored["loras"] == [f"{(context.output_dir.parent / 'loras' / 'style.safetensors').resolve()}:0.7"]
    assert white(Image.open(stored["entity_masks"][0]))[:16].all()
    # `qistudio generate --from-png` reads a UI image back, inputs included.
    args = build_parser().parse_args(["generate", "--from-png", str(paths[0]), "--device", "cpu"])
    settings = resolve_settings(args)
    assert (settings["prompt"], settings["seed"], settings["steps"], settings["size"]) == ("a room", 3, 2, (64, 64))
    assert settings["entities"] == ["a lamp"] and settings["entity_images"][0].size == (64, 64)
    listed = records.list_results(context.images_dir)
    assert sorted(path for path, _ in listed) == sorted(str(p) for p in paths)
    assert {caption for _, caption in listed} == {"a room"}


def test_a_pngs_parameters_fill_the_generate_form(context, tmp_path):
    spec = forms.generation("a cat", forms.Settings(size=(96, 64), steps=5, cfg_scale=3.0, seed=9,
                                                    scheduler="Qwen-Image-Lightning"), [["style", 0.5]])
    (png,) = records.save_results(finished(spec, [Image.new("RGB", (96, 64))]), context)
    catalog = {name: str(context.engine.loras.path(name)) for name in context.engine.loras.names()}
    fields = records.generate_fields(records.read_parameters(png), catalog)
    assert {k: fields[k] for k in ("prompt", "seed", "steps", "cfg", "width", "height", "scheduler", "loras")} == {
        "prompt": "a cat", "seed": 9, "steps": 5, "cfg": 3.0, "width": 96, "height": 64,
        "scheduler": "Qwen-Image-Lightning", "loras": [["style", 0.5]]}
    assert records.generate_fields(records.read_parameters(png), {})["missing_loras"] == [catalog["style"]]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(InputError, match="carries no qistudio parameters"):
        records.read_parameters(plain)


# --- training --------------------------------------------------------------------------------------------------------

def test_captions_of_a_folder_edited_and_saved(tmp_path):
    for name in ("b.png", "a.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert dataset.read_captions(tmp_path) == [["a.png", ""], ["b.png", ""]]
    with pytest.raises(InputError, match="has no caption"):
        dataset.write_captions(tmp_path, [["a.png", "a cat"], ["b.png", " "]])
    with pytest.raises(InputError, match="not a file"):
        dataset.write_captions(tmp_path, [["c.png", "a cat"]])
    dataset.write_captions(tmp_path, [["a.png", "a cat, \"quoted\""], ["b.png", "a dog"], ["", ""]])
    rows = list(csv.DictReader(open(tmp_path / "metadata.csv", encoding="utf-8")))
    assert rows == [{"image": "a.png", "prompt": "a cat, \"quoted\""}, {"image": "b.png", "prompt": "a dog"}]
    assert dataset.read_captions(tmp_path)[0] == ["a.png", "a cat, \"quoted\""]
    assert [caption for _, caption in dataset.thumbnails(tmp_path, dataset.read_captions(tmp_path))] == [
        "a.png: a cat, \"quoted\"", "b.png: a dog"]
    with pytest.raises(InputError, match="no such folder"):
        dataset.read_captions(tmp_path / "missing")


def test_the_training_command_is_one_qistudio_train_accepts(tmp_path):
    from qistudio.cli.main import build_parser
    from qistudio.cli.train import build_config
    from qistudio.demo import write_demo_model
    from qistudio.training.demo_data import write_demo_dataset
    from qistudio.weights.model_config import ModelConfig

    demo = write_demo_model(tmp_path / "demo")
    data = write_demo_dataset(tmp_path / "data").parent
    spec = ModelSpec.from_configs("demo", [ModelConfig(path=str(demo / n)) for n in ("transformer", "text_encoder",
                                                                                       "vae")],
                                  ModelConfig(path=str(demo / "tokenizer")))
    settings = training.TrainSettings("run", str(data), rank=4, learning_rate=2e-4, max_steps=7, save_steps=3,
                                      validation_prompt="a red circle", validation_steps=2,
                                      validation_size=(64, 48), validation_inference_steps=2)
    line, env = training.command(settings, spec, tmp_path / "out", resume=True, cpu=True)
    assert line[1] == "-c" and env == {}
    args = build_parser().parse_args(line[3:])
    config = build_config(args)
    assert (config.lora_rank, config.learning_rate, config.max_steps, config.save_steps) == (4, 2e-4, 7, 3)
    assert config.model_paths == tuple(str(demo / n) for n in ("transformer", "text_encoder", "vae"))
    assert config.validation_prompts == ("a red circle",) and config.validation_size == (64, 48)
    assert config.enable_csv_log and config.device == "cpu" and args.resume == "latest"
    hub = ModelSpec("q", ({"model_id": "Qwen/Qwen-Image", "origin_file_pattern": "vae/x.safetensors",
                           "local_model_path": "/m"},), dtype="bfloat16")
    assert training.model_arguments(hub) == (["--model_id_with_origin_paths", "Qwen/Qwen-Image:vae/x.safetensors",
                                              "--dtype", "bfloat16"], {"QISTUDIO_MODEL_BASE_PATH": "/m"})
    for bad, words in ((dict(name="../x"), "run name"), (dict(dataset=str(tmp_path)), "no metadata.csv"),
                       (dict(max_steps=0), "max steps")):
        with pytest.raises(InputError, match=words):
            training.check(training.TrainSettings(**{**settings.__dict__, **bad}))


def test_a_run_reads_its_losses_samples_and_log(tmp_path):
    run = training.TrainingRun(tmp_path)
    assert run.state() == "idle" and run.status() == "no run yet" and run.losses() == []
    run.settings = training.TrainSettings("r", "data", max_steps=10)
    folder = tmp_path / "r"
    (folder / "samples" / "step-2").mkdir(parents=True)
    (folder / "samples" / "step-10").mkdir()
    for step in ("step-2", "step-10"):
        Image.new("RGB", (4, 4)).save(folder / "samples" / step / "00.png")
    (folder / "loss.csv").write_text("step,loss,lr,time\n1,0.5,1e-4,1\n2,0.25,1e-4,2\n")
    (folder / training.LOG_FILE).write_text("start\rtraining: 1/10\rtraining: 2/10\nqistudio: interrupted\n")
    assert run.losses() == [(1, 0.5), (2, 0.25)]
    assert [caption for _, caption in run.samples()] == ["step 10", "step 2"]
    assert run.log_tail(2) == "training: 2/10\nqistudio: interrupted" and run.last_error() == "qistudio: interrupted"


# --- the command line ------------------------------------------------------------------------------------------------

def test_ui_refuses_an_open_address_a_public_link_or_a_taken_port_without_loading(capsys, tmp_path, monkeypatch):
    from qistudio.cli.main import main

    monkeypatch.delenv("QISTUDIO_UI_PASSWORD", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--host", "0.0.0.0"], "give --password"), (["--share"], "--share makes the UI public"),
                 (["--demo", "--model", "x"], "not both"), (["--lora-dir", str(tmp_path / "no")], "no such folder"),
                 (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["--output-dir", str(tmp_path / "f.txt")], "is a file"),
                 (["--controlnet", "canny"], "--demo serves its own tiny canny ControlNet"),
                 (["--model", "Qwen/Qwen-Image", "--controlnet", "pose"], "KIND or KIND=SOURCE with KIND one of"),
                 (["--model", "Qwen/Qwen-Image", "--controlnet", "canny", "--controlnet", "canny=x"], "each kind once"),
                 (["--model", "Qwen/Qwen-Image-2.1", "--controlnet", "canny"], "beside a Qwen-Image model"),
                 (["--model", "Qwen/Qwen-Image", "--layered-model", "Qwen/Qwen-Image"], "not a Qwen-Image-Layered")]
        (tmp_path / "f.txt").write_text("")
        for arguments, words in cases:
            with pytest.raises(SystemExit) as stop:
                main(["ui", "--demo", *arguments] if "--model" not in arguments else ["ui", *arguments])
            assert stop.value.code == 2
            assert words in capsys.readouterr().err


def test_the_ui_beside_the_api_in_serve(tmp_path):
    """/ui has Gradio's login (the API key as password) while the API keeps its Bearer key."""
    from fastapi.testclient import TestClient

    from qistudio.server.app import create_app
    from qistudio.server.settings import ServerSettings
    from qistudio.ui.mount import UI_PATH, UI_USER, with_ui

    engine = Engine(EngineConfig(model=ModelSpec("qistudio-demo", (), extra={"demo": True})))
    settings = ServerSettings("qistudio-demo", api_key="sk-ui")
    app = with_ui(create_app(engine, settings, own_engine=False), engine, settings, str(tmp_path))
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer sk-ui"}).json()["data"][0]["id"] == \
            "qistudio-demo"
        assert http.get(f"{UI_PATH}/config").status_code == 401
        assert http.post(f"{UI_PATH}/login", data={"username": UI_USER, "password": "wrong"}).status_code == 400
        assert http.post(f"{UI_PATH}/login", data={"username": UI_USER, "password": "sk-ui"}).status_code == 200
        config = http.get(f"{UI_PATH}/config").json()
        assert any(c.get("props", {}).get("elem_id") == "gen-prompt" for c in config["components"])


# --- a real engine ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from qistudio.demo import write_demo_model
    from qistudio.weights.model_config import ModelConfig

    demo = write_demo_model(tmp_path_factory.mktemp("demo"))
    spec = ModelSpec.from_configs("qistudio-demo", [ModelConfig(path=str(demo / n)) for n in
                                                    ("transformer", "text_encoder", "vae")],
                                  ModelConfig(path=str(demo / "tokenizer")), extra={"demo": True})

    def start(model):
        return Engine(EngineConfig(model=model, threads_per_worker=1)).start(timeout=300)

    holder = EngineHolder(start(spec))
    yield holder, start
    holder.shutdown()


def test_runs_follow_a_job_to_its_images_and_cancel_it(demo_engine):
    from qistudio.ui.runs import Runs

    holder, _ = demo_engine
    runs = Runs(holder)
    updates = list(runs.follow(forms.generation("a cat", SMALL), ("session", "generate")))
    assert updates[0].status.startswith("queued") and updates[-1].finished
    assert updates[-1].job.state is JobState.SUCCEEDED and updates[-1].job.result.images[0].size == (64, 64)
    steps = [u for u in updates if u.status.startswith("step")]
    assert steps[-1].status == "step 2/2" and steps[-1].preview is not None  # a preview with each step
    assert runs.cancel(("session", "generate")) == "nothing to cancel"

    long_run = runs.follow(forms.generation("a cat", forms.Settings(size=(256, 256), steps=1000, seed=1)),
                           ("session", "generate"))
    for update in long_run:
        if update.status.startswith("step"):
            assert runs.cancel(("other", "generate")) == "nothing to cancel"  # another browser's tab
            assert runs.cancel(("session", "generate")).startswith("cancelling")
            break
    rest = list(long_run)
    assert rest[-1].status == "cancelled" and rest[-1].job.state is JobState.CANCELLED


def test_a_failed_swap_keeps_a_working_engine(demo_engine):
    holder, start = demo_engine
    broken = holder.spec.replace(model_configs=({"path": "/no/such/folder"},), name="broken")
    with pytest.raises(EngineError, match="could not load broken"):
        holder.swap(broken, start)
    assert holder.spec.name == "qistudio-demo"
    job = holder.engine.submit(forms.generation("a cat", SMALL))
    assert job.wait(120) and job.state is JobState.SUCCEEDED


def test_the_served_family_is_told_from_the_model(tmp_path):
    """serve and ui pick the engine's family as generate does: 2.1 and Layered by hub id or folder config."""
    from qistudio.cli.serve_models import family_of

    layered = tmp_path / "layered"
    (layered / "transformer").mkdir(parents=True)
    (layered / "transformer" / "config.json").write_text('{"use_layer3d_rope": true}')
    plain = tmp_path / "plain"
    (plain / "transformer").mkdir(parents=True)
    (plain / "transformer" / "config.json").write_text('{"num_layers": 60}')
    cases = {"Qwen/Qwen-Image": "qwen-image", "Qwen/Qwen-Image-2512": "qwen-image", "Qwen/Qwen-Image-Edit-2511":
             "qwen-image", "Qwen/Qwen-Image-2.1": "qwen-image-2.1", "Qwen/Qwen-Image-Layered": "qwen-image-layered",
             str(layered): "qwen-image-layered", str(plain): "qwen-image"}
    assert {model: family_of(model) for model in cases} == cases


def test_generate_and_edit_forms_are_qwen21_jobs(tmp_path):
    """With Qwen-Image 2.1 served, the Generate and Edit tabs' JobSpecs are checked against 2.1's pipe(...), whose
    defaults (40 steps, no guidance, 1024x1024) the forms start from."""
    served = ModelSpec("2.1", (), family="qwen-image-2.1")
    ctx = UIContext(EngineHolder(Engine(EngineConfig(model=served))), tmp_path)
    assert (ctx.default_steps, ctx.default_cfg, ctx.default_size) == (40, 1.0, (1024, 1024))
    settings = forms.Settings(size=(64, 64), steps=2, cfg_scale=ctx.default_cfg, seed=1)
    request = validate(forms.generation("a fox", settings), (), served)
    assert (request.height, request.width, request.cfg_scale) == (64, 64, 1.0)
    pictures = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    assert len(validate(forms.edit("merge", settings, pictures), (), served).edit_images) == 2
    with pytest.raises(InputError, match="unknown argument 'edit_image_auto_resize'; a Qwen-Image 2.1 job takes"):
        validate(forms.edit("x", settings, pictures, lowres_fix=True), (), served)
    # 2.1 reads RGBA: a transparent picture reaches it as it is (the 20B models get RGB), an opaque one as RGB.
    glass = Image.new("RGBA", (64, 64), (40, 90, 200, 100))
    spec = forms.edit("x", settings, [glass, pictures[0]], keep_alpha=True)
    assert [image.mode for image in spec.arguments["edit_image"]] == ["RGBA", "RGB"]
    kept = validate(spec, (), served).edit_images
    assert kept[0].getpixel((3, 3))[3] == 100 and kept[1].convert("RGBA").getpixel((3, 3))[3] == 255
    assert forms.edit("x", settings, [glass]).arguments["edit_image"].mode == "RGB"
    from qistudio.ui.app import build_blocks

    modes = [c["props"].get("image_mode") for c in build_blocks(ctx).get_config_file()["components"]
             if (c.get("props", {}).get("elem_id") or "").startswith("edit-image-")]
    assert modes == ["RGBA"] * 3


def test_the_generate_tab_runs_qwen21_through_the_engine(tmp_path_factory):
    """The Generate form's job on a served Qwen-Image 2.1 (its own worker): an RGBA result equal to pipe(...),
    saved with 2.1's parameters."""
    from tiny_qwen21 import model_configs21, tiny_repository21

    from qistudio import QwenImagePipeline
    from qistudio.imageio import read_png_parameters
    from qistudio.ui.runs import Runs
    from qistudio.weights.model_config import ModelConfig

    repo = tiny_repository21(tmp_path_factory)
    processor = ModelConfig(path=str(repo / "processor"))
    served = ModelSpec.from_configs(str(repo), model_configs21(repo), None, processor, family="qwen-image-2.1",
                                    extra={"model": str(repo)})
    holder = EngineHolder(Engine(EngineConfig(model=served, threads_per_worker=1)).start(timeout=300))
    try:
        ctx = UIContext(holder, tmp_path_factory.mktemp("out"))
        spec = forms.generation("a fox", forms.Settings(size=(96, 64), steps=2, cfg_scale=ctx.default_cfg, seed=2))
        (last,) = [u for u in Runs(holder).follow(spec, ("session", "generate")) if u.finished]
        assert last.job.state is JobState.SUCCEEDED, last.job.error
        (path,) = records.save_results(last.job, ctx)
    finally:
        holder.shutdown()
    stored = read_png_parameters(path)
    assert (stored["cfg"], stored["size"], stored["model"]) == (1.0, "96x64", str(repo))
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=model_configs21(repo),
                                             tokenizer_config=None, processor_config=processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = pipe("a fox", height=64, width=96, num_inference_steps=2, seed=2, progress_bar_cmd=lambda s: s)
    finally:
        torch.set_num_threads(threads)
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        assert np.abs(np.asarray(image).astype(np.int16) - np.asarray(expected).astype(np.int16)).max() <= 1
