"""`qistudio ui --demo` in a real browser: Playwright driving Debian's chromium (apt-get install chromium; Playwright's
own browser download is not used), as a user clicks, types, paints and drops files.

One UI process (the demo model, one CPU worker) and one page serve the whole module; the tests run in order and
build on each other as a session would: generate, edit the result, repaint part of it, draw two EliGen regions,
stack a LoRA, cancel a long run, drop a PNG to reload its parameters, train a tiny LoRA and stop it. Each checks
what the UI wrote (the PNG's parameters and the inputs saved beside it), not only what it shows; the first compares
the image with the same request run through pipe(...) in this process. Screenshots go to $QISTUDIO_UI_SCREENSHOTS
(the README's come from there) or a temporary folder.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("gradio", reason="the UI needs Gradio: pip install 'qistudio[ui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("the browser tests need Debian's chromium: apt-get install -y chromium", allow_module_level=True)

from lora_files import peft_layout, random_pairs  # noqa: E402
from qistudio.imageio import read_png_parameters  # noqa: E402
from server_harness import free_port, pixels, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300
RUN_TIMEOUT = 90_000  # ms, one tiny generation on a busy 2-core machine
LIGHTNING_FILE = "Qwen-Image-Lightning-4steps-V2.0-bf16.safetensors"  # presets.LORA_PRESETS' file
expect = sync_api.expect
expect.set_options(timeout=30_000)  # a busy 2-core machine answers a click in seconds, not milliseconds


def newest_png(folder: Path, since: float = 0.0) -> Path:
    found = [p for p in folder.glob("*.png") if p.stat().st_mtime >= since]
    assert found, f"no result PNG in {folder}"
    return max(found, key=lambda p: p.stat().st_mtime)


# --- the UI process and the browser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`qistudio ui --demo` on a free loopback port: (url, output folder, LoRA file, demo model folder)."""
    from qistudio.demo import DEMO_DIT, write_demo_model
    from qistudio.models.dit import QwenImageDiT
    from qistudio.weights.build import empty_parameters

    home = tmp_path_factory.mktemp("xdg")
    demo = write_demo_model(home / "qistudio" / "demo")
    loras = tmp_path_factory.mktemp("loras")
    with empty_parameters():  # shapes only: the LoRA fits the demo DiT
        dit = QwenImageDiT(DEMO_DIT)
    lora = loras / "style.safetensors"
    save_file(peft_layout(random_pairs(dit, seed=1)), str(lora))
    # A file named as the Lightning preset's LoRA, so that choosing the preset stacks it.
    save_file(peft_layout(random_pairs(dit, seed=2)), str(loras / LIGHTNING_FILE))
    output = tmp_path_factory.mktemp("ui-output")
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    log = open(output.parent / "ui.log", "w")
    command = [sys.executable, "-m", "qistudio.cli.main", "ui", "--demo", "--port", str(port), "--output-dir",
               str(output), "--lora-dir", str(loras), "--threads", "1"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    import httpx

    while True:
        if process.poll() is not None:
            pytest.fail(f"qistudio ui exited ({process.returncode}): {(output.parent / 'ui.log').read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"qistudio ui did not start within {START_TIMEOUT} s")
        time.sleep(0.5)
    yield url, output, lora, demo
    stop_server(process)
    log.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("QISTUDIO_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(ui):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(ui[0])
        page.wait_for_selector("#gen-prompt textarea", timeout=60_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def reference_pipe(ui):
    from qistudio import ModelConfig, QwenImagePipeline

    demo = ui[3]
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(demo / name)) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(demo / "tokenizer")))


# --- what a user does ------------------------------------------------------------------------------------------------

def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def number(page, element: str, value) -> None:
    """Type into a Number, or a Slider's number box, and commit it."""
    box = page.locator(f"#{element} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def choose(page, element: str, option: str) -> None:
    page.locator(f"#{element} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def small(page, prefix: str, steps: int = 2, side: int = 64, seed: int | None = 7) -> None:
    """The tab's settings at a tiny size and step count, with a fixed seed."""
    number(page, f"{prefix}-width", side)
    number(page, f"{prefix}-height", side)
    number(page, f"{prefix}-steps", steps)
    if seed is not None:
        page.locator(f"#{prefix}-seed-mode label").filter(has_text="fixed").click()
        number(page, f"{prefix}-seed", seed)


# Polled in the page until a run ends: {"done": status} once the status says so, {"error": what} as soon as
# Gradio's progress over the status shows "Error", a new error toast appears or the job failed, so that a test
# fails at once with the message instead of waiting out RUN_TIMEOUT while the toast fades. Toasts shown before
# the click are marked seen.
RUN_ENDED = """([selector, before]) => {
    const status = (document.querySelector(selector)?.innerText ?? "").trim();
    const errors = [...document.querySelectorAll(".toast-body.error")].filter(t => !t.dataset.seen)
        .map(t => t.innerText.replace(/\\s+/g, " ").trim());
    if (errors.length || document.querySelector(`${selector} [data-testid=status-tracker] .error`)
            || /^(failed|cancelled)\\b/m.test(status)) {
        return {error: `status ${JSON.stringify(status)}; messages: ${JSON.stringify(errors)}`};
    }
    // The old "done" line stays under Gradio's progress text until the run's first update replaces it.
    return status.includes("done") && !(before && status.includes(before)) ? {done: status} : false;
}"""


def run_and_wait(page, prefix: str, timeout: float = RUN_TIMEOUT) -> str:
    """Click the tab's Run and wait for its status to say "done"; returns that status."""
    selector = f"#{prefix}-status"
    before = page.inner_text(selector).strip()
    page.evaluate("document.querySelectorAll('.toast-body').forEach(t => { t.dataset.seen = '1'; })")
    page.click(f"#{prefix}-run")
    try:
        ended = page.wait_for_function(RUN_ENDED, arg=[selector, before], timeout=timeout, polling=200).json_value()
    except sync_api.TimeoutError:
        raise AssertionError(f"{prefix}: still {page.inner_text(selector)!r}; messages: {toasts(page)}") from None
    assert "error" not in ended, f"{prefix}: {ended['error']}"
    expect(page.locator(f"#{prefix}-results img").first).to_be_visible()
    return ended["done"]


def snap(page, folder: Path, name: str) -> None:
    """A screenshot of the whole page, shrunk to 960 pixels wide and 256 colours (README-sized, < 200 KB)."""
    import io

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image = image.resize((960, round(image.height * 960 / image.width)), Image.LANCZOS)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(folder / name, optimize=True)


def toasts(page) -> list[str]:
    """The messages Gradio shows (errors, warnings, notes)."""
    return page.locator(".toast-body").all_inner_texts()


def image_rect(page, element: str, size: tuple[int, int]) -> dict:
    """Where the editor shows its picture: centred in its canvas at the zoom it displays."""
    canvas = page.locator(f"#{element} .pixi-target canvas").bounding_box()
    zoom = float(page.inner_text(f"#{element} .zoom-number span").strip().rstrip("%")) / 100
    width, height = size[0] * zoom, size[1] * zoom
    return {"x": canvas["x"] + (canvas["width"] - width) / 2, "y": canvas["y"] + (canvas["height"] - height) / 2,
            "width": width, "height": height}


def wait_for_canvas(page, element: str, size: tuple[int, int]) -> None:
    """Until the editor shows a picture of `size` fitted to its canvas: the new value it was sent has loaded (strokes
    drawn before that land on the canvas it replaces, and are not sent)."""
    page.wait_for_function("""([element, width, height]) => {
        const canvas = document.querySelector(`#${element} .pixi-target canvas`);
        const zoom = parseFloat(document.querySelector(`#${element} .zoom-number span`)?.innerText ?? "");
        if (!canvas || !zoom) return false;
        const box = canvas.getBoundingClientRect();  // fitted: the picture spans more than half the canvas
        return zoom / 100 * Math.max(width / box.width, height / box.height) > 0.5;
    }""", arg=[element, *size])


def stroke(page, rect: dict, start: tuple[float, float], end: tuple[float, float], steps: int = 4) -> None:
    """Drag the mouse across the picture from `start` to `end` (fractions of its width and height)."""
    (x0, y0), (x1, y1) = ((rect["x"] + rect["width"] * fx, rect["y"] + rect["height"] * fy) for fx, fy in (start, end))
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, steps + 1):
        page.mouse.move(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
    page.mouse.up()


def select_result(page, index: int = 0) -> dict:
    """Open the Gallery, select a result, and return the parameters it shows."""
    tab(page, "Gallery")
    page.click("#gallery-refresh")
    item = page.locator("#gallery button.thumbnail-item").nth(index)
    if not item.is_visible():  # the gallery opens on its grid; in preview mode the thumbnails are a strip
        item = page.locator("#gallery img").nth(index)
    item.click()
    expect(page.locator("#gallery-params")).to_contain_text('"prompt"')
    return page.locator("#gallery-params").inner_text()


def shows_new_image(page, element: str, action) -> None:
    """Do `action`, then wait until the image component shows a picture it did not show before (the Control tab
    keeps the previous test's picture and map, so "an image is visible" would pass at once)."""
    image = page.locator(f"#{element} img").first
    before = image.get_attribute("src") if image.count() else None
    action()
    expect(image).to_be_visible()
    if before is not None:
        expect(image).not_to_have_attribute("src", before)


def wait_for_step_past(page, step: int, seconds: float) -> None:
    """Until the Train tab shows a running step after `step` (it reads the run's loss.csv every second)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        shown = re.search(r"running \(step (\d+)/", page.inner_text("#train-status"))
        if shown and int(shown[1]) > step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no step after {step} within {seconds} s: {page.inner_text('#train-status')!r}")


def mask_box(path) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the white part of a mask image."""
    white = np.asarray(Image.open(path).convert("L")) > 127
    rows, cols = np.nonzero(white)
    return rows.min(), rows.max(), cols.min(), cols.max()


# --- the session -----------------------------------------------------------------------------------------------------

def test_generate_makes_the_image_pipe_makes(page, ui, shots, reference_pipe):
    output = ui[1]
    page.fill("#gen-prompt textarea", "a red circle on a white background")
    small(page, "gen")
    status = run_and_wait(page, "gen")
    assert "seed 7" in status
    snap(page, shots, "generate.png")
    png = newest_png(output / "images")
    stored = read_png_parameters(png)
    assert (stored["prompt"], stored["seed"], stored["steps"], stored["size"], stored["demo"]) == (
        "a red circle on a white background", 7, 2, "64x64", True)
    # One code path: the same arguments through pipe(...) here give the same picture.
    expected = reference_pipe("a red circle on a white background", seed=7, num_inference_steps=2, height=64, width=64)
    diff = np.abs(pixels(Image.open(png)) - pixels(expected))
    assert diff.max() <= 1, diff.max()


def test_edit_the_result(page, ui, shots):
    output = ui[1]
    select_result(page, 0)
    first_png = newest_png(output / "images")
    first = read_png_parameters(first_png)
    page.click("#gallery-to-edit")
    expect(page.get_by_role("tab", name="Edit", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator("#edit-image-1 img")).to_be_visible()
    page.fill("#edit-prompt textarea", "make the circle blue")
    page.locator("#edit-lowres label").click()  # Lowres-Fix: the 64x64 image stays 64x64 (fast on the CPU)
    choose(page, "edit-size", "free size")
    small(page, "edit")
    started = time.time()
    run_and_wait(page, "edit")
    snap(page, shots, "edit.png")
    stored = read_png_parameters(newest_png(output / "images", started))
    assert stored["prompt"] == "make the circle blue" and stored["size"] == "64x64"
    assert stored["edit_rope_interpolation"] is True and stored["edit_image_auto_resize"] is False
    (edit_input,) = stored["edit_images"]  # the selected result, saved as the job's input
    assert first["job"] != stored["job"]
    assert (pixels(Image.open(edit_input)) == pixels(Image.open(first_png))).all()


def test_paint_an_inpaint_mask(page, ui, shots):
    output = ui[1]
    select_result(page, 0)
    page.click("#gallery-to-inpaint")
    expect(page.get_by_role("tab", name="Inpaint & image-to-image", exact=True)).to_have_attribute(
        "aria-selected", "true")
    wait_for_canvas(page, "inpaint-editor", (64, 64))
    page.locator("#inpaint-editor button[aria-label='Brush']").click()
    stroke(page, image_rect(page, "inpaint-editor", (64, 64)), (0.15, 0.5), (0.85, 0.5))  # across the middle
    page.fill("#inpaint-prompt textarea", "a blue stripe")
    number(page, "inpaint-strength", 0.8)
    number(page, "inpaint-steps", 2)
    started = time.time()
    run_and_wait(page, "inpaint")
    snap(page, shots, "inpaint.png")
    stored = read_png_parameters(newest_png(output / "images", started))
    assert stored["strength"] == 0.8 and stored["size"] == "64x64"
    assert Image.open(stored["input_image"]).size == (64, 64)
    top, bottom, left, right = mask_box(stored["inpaint_mask"])
    assert 8 <= top < 32 < bottom <= 56, (top, bottom)  # a band across the middle: the rows above and below kept
    assert left <= 16 and right >= 48, (left, right)


def test_draw_two_eligen_regions(page, ui, shots):
    output = ui[1]
    tab(page, "EliGen")
    choose(page, "eligen-size", "free size")
    small(page, "eligen")
    page.click("#eligen-new-canvas")
    wait_for_canvas(page, "eligen-editor", (64, 64))  # the 256x256 canvas it replaces shows at a quarter of that
    page.locator("#eligen-editor button[aria-label='Brush']").click()
    rect = image_rect(page, "eligen-editor", (64, 64))
    stroke(page, rect, (0.1, 0.2), (0.35, 0.2))  # red, top left
    colour = page.locator("#eligen-editor button[aria-label='Color']")
    colour.click()
    page.locator("#eligen-editor menu.swatch button.color").nth(1).click()  # green
    expect(colour).to_have_attribute("style", re.compile(r"rgb\(60, 180, 75\)"))  # the brush is green now
    page.mouse.click(5, 5)  # close the colour menu
    stroke(page, rect, (0.65, 0.8), (0.9, 0.8))  # green, bottom right
    page.fill("#eligen-entity-red textarea", "a red apple")
    page.fill("#eligen-entity-green textarea", "a green leaf")
    page.fill("#eligen-prompt textarea", "fruit on a table")
    started = time.time()
    run_and_wait(page, "eligen")
    snap(page, shots, "eligen.png")
    stored = read_png_parameters(newest_png(output / "images", started))
    assert stored["entities"] == ["a red apple", "a green leaf"]
    red, green = (mask_box(path) for path in stored["entity_masks"])
    assert red[1] < 32 and red[3] < 40, red  # top left
    assert green[0] > 32 and green[2] > 30, green  # bottom right
    overlap = (np.asarray(Image.open(stored["entity_masks"][0]).convert("L")) > 127) & (
        np.asarray(Image.open(stored["entity_masks"][1]).convert("L")) > 127)
    assert not overlap.any()


def test_load_a_lora(page, ui, shots):
    output, lora = ui[1], ui[2]
    tab(page, "LoRA")
    choose(page, "lora-choice", "style")
    number(page, "lora-scale", 0.8)
    page.click("#lora-add")
    expect(page.locator("#lora-stack")).to_contain_text("style")
    snap(page, shots, "lora.png")
    tab(page, "Generate")
    expect(page.locator("#gen-loras")).to_contain_text("style (0.8)")
    started = time.time()
    run_and_wait(page, "gen")  # the first test's settings, with the LoRA
    with_lora = newest_png(output / "images", started)
    stored = read_png_parameters(with_lora)
    assert stored["loras"] == [f"{lora.resolve()}:0.8"]
    plain = [p for p in (output / "images").glob("*.png")
             if read_png_parameters(p)["job"] != stored["job"] and read_png_parameters(p)["prompt"] == stored["prompt"]
             and not read_png_parameters(p)["loras"]]
    assert plain and np.abs(pixels(Image.open(with_lora)) - pixels(Image.open(plain[0]))).max() > 8
    tab(page, "LoRA")
    page.click("#lora-clear")
    expect(page.locator("#lora-stack")).not_to_contain_text("style")


def test_a_distilled_preset_sets_its_sampling_and_stacks_its_lora(page):
    tab(page, "Generate")
    choose(page, "gen-preset", "Qwen-Image-Lightning-4steps")
    expect(page.locator("#gen-steps input[type=number]")).to_have_value("4")
    expect(page.locator("#gen-cfg input[type=number]")).to_have_value("1")
    expect(page.locator("#gen-scheduler input")).to_have_value("Qwen-Image-Lightning")
    expect(page.locator("#gen-loras")).to_contain_text(LIGHTNING_FILE.removesuffix(".safetensors") + " (1)")
    tab(page, "LoRA")
    page.click("#lora-clear")
    tab(page, "Generate")
    expect(page.locator("#gen-loras")).to_contain_text("none")


def test_in_context_control_from_canny_edges(page, ui):
    from qistudio.annotators import canny

    output = ui[1]
    picture = min((output / "images").glob("*.png"), key=lambda p: p.stat().st_mtime)
    tab(page, "Control")
    shows_new_image(page, "control-source",
                    lambda: page.locator("#control-source input[type=file]").set_input_files(str(picture)))
    shows_new_image(page, "control-map", lambda: page.click("#control-canny"))
    choose(page, "control-method", "In-Context control (LoRA)")
    page.fill("#control-prompt textarea", "a house")
    small(page, "control")
    started = time.time()
    run_and_wait(page, "control")
    stored = read_png_parameters(newest_png(output / "images", started))
    assert stored["prompt"] == "a house"  # the pipeline adds the In-Context trigger words itself
    assert (pixels(Image.open(stored["context_image"])) == pixels(canny(Image.open(picture)))).all()



def test_blockwise_controlnet_from_canny_edges(page, ui, shots, tmp_path):
    """The Control tab with the demo's tiny canny ControlNet: Canny edges of a picture, scale and window; the image
    equals pipe(...) with the same ControlNetInput."""
    from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
    from qistudio.annotators import canny
    from qistudio.demo_family import write_demo_controlnet

    output, demo = ui[1], ui[3]
    picture = Image.new("RGB", (64, 64), "white")
    picture.paste((200, 30, 30), (16, 16, 48, 48))
    picture.save(tmp_path / "square.png")
    tab(page, "Control")
    shows_new_image(page, "control-source", lambda: page.locator("#control-source input[type=file]").set_input_files(
        str(tmp_path / "square.png")))
    shows_new_image(page, "control-map", lambda: page.click("#control-canny"))  # not the last test's map
    choose(page, "control-method", "Blockwise ControlNet: canny")
    number(page, "control-scale", 0.8)
    number(page, "control-start", 0.9)
    page.fill("#control-prompt textarea", "a red square")
    small(page, "control", seed=9)
    started = time.time()
    run_and_wait(page, "control")
    snap(page, shots, "control.png")
    png = newest_png(output / "images", started)
    stored = read_png_parameters(png)
    (control,) = stored["controls"]
    kind, path, scale = control.split(":")
    edges = canny(picture)
    assert (kind, scale) == ("canny", "0.8") and (pixels(Image.open(path)) == pixels(edges)).all()
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=ModelConfig(path=str(demo / "tokenizer")),
        model_configs=[*(ModelConfig(path=str(demo / name)) for name in ("transformer", "text_encoder", "vae")),
                       ModelConfig(path=str(write_demo_controlnet(demo)))])
    expected = pipe("a red square", seed=9, num_inference_steps=2, height=64, width=64, blockwise_controlnet_inputs=[
        ControlNetInput(image=edges, scale=0.8, start=0.9, end=0.0, controlnet_id=0)])
    assert np.abs(pixels(Image.open(png)) - pixels(expected)).max() <= 1


def test_split_a_picture_into_layers(page, ui, shots, tmp_path):
    """The Layers tab on the demo's tiny Layered model: two RGBA layers, each PNG recording its place."""
    output = ui[1]
    picture = Image.new("RGBA", (64, 48), (255, 255, 255, 255))
    picture.paste((30, 30, 200, 255), (8, 8, 40, 40))
    picture.save(tmp_path / "blue.png")
    tab(page, "Layers")
    page.locator("#layers-picture input[type=file]").set_input_files(str(tmp_path / "blue.png"))
    expect(page.locator("#layers-picture img")).to_be_visible()
    number(page, "layers-count", 2)
    number(page, "layers-steps", 2)
    page.locator("#layers-seed-mode label").filter(has_text="fixed").click()
    number(page, "layers-seed", 5)
    page.fill("#layers-prompt textarea", "a blue square on white")
    started = time.time()
    run_and_wait(page, "layers", timeout=3 * RUN_TIMEOUT)  # 640-pixel working size, on a CPU
    snap(page, shots, "layers.png")
    pngs = sorted(p for p in (output / "images").glob("*.png") if p.stat().st_mtime >= started)
    assert len(pngs) == 2
    for index, png in enumerate(pngs):
        stored = read_png_parameters(png)
        assert (stored["layers"], stored["layer"], stored["prompt"]) == (2, index + 1, "a blue square on white")
        with Image.open(png) as layer:
            assert layer.mode == "RGBA"
        assert Image.open(stored["input_image"]).size == (64, 48)

def test_cancel_a_run(page, ui, shots):
    output = ui[1]
    tab(page, "Generate")
    before = len(list((output / "images").glob("*.png")))
    small(page, "gen", steps=200, side=1024, seed=None)  # long enough to be caught running
    page.click("#gen-run")
    status = page.locator("#gen-status")
    expect(status).to_contain_text(re.compile(r"step \d+/200"), timeout=RUN_TIMEOUT)
    expect(page.locator("#gen-preview img")).to_be_visible()  # the step's preview
    page.click("#gen-cancel")
    snap(page, shots, "progress.png")
    try:
        expect(status).to_contain_text("cancelled", timeout=RUN_TIMEOUT)
    except AssertionError:
        raise AssertionError(f"{status.inner_text()!r}; messages: {toasts(page)}") from None
    assert len(list((output / "images").glob("*.png"))) == before


def test_drop_a_png_to_reload_its_parameters(page, ui, shots):
    output = ui[1]
    first = min((output / "images").glob("*.png"), key=lambda p: p.stat().st_mtime)  # the first test's image
    tab(page, "Generate")
    page.fill("#gen-prompt textarea", "something else")
    number(page, "gen-steps", 9)
    tab(page, "Gallery")
    # A real drop: the file dragged onto the drop zone as a browser's DataTransfer carries it.
    drop_zone = page.locator("#gallery-drop button[aria-dropeffect]")
    data = list(first.read_bytes())
    handle = page.evaluate_handle(
        """([name, bytes]) => { const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'})); return t; }""",
        [first.name, data])
    for kind in ("dragenter", "dragover", "drop"):
        drop_zone.dispatch_event(kind, {"dataTransfer": handle})
    expect(page.get_by_role("tab", name="Generate", exact=True)).to_have_attribute("aria-selected", "true",
                                                                                 timeout=RUN_TIMEOUT)
    expect(page.locator("#gen-prompt textarea")).to_have_value("a red circle on a white background")
    stored = read_png_parameters(first)
    assert page.input_value("#gen-seed input") == str(stored["seed"])
    assert page.input_value("#gen-steps input[type=number]") == str(stored["steps"])
    assert (page.input_value("#gen-width input"), page.input_value("#gen-height input")) == ("64", "64")
    snap(page, shots, "reloaded.png")


def test_models_tab_shows_the_workers_and_restarts_them(page, ui):
    tab(page, "Models")
    page.click("#models-refresh")
    expect(page.locator("#models-info")).to_contain_text("qistudio-demo")
    expect(page.locator("#models-health")).to_contain_text('"idle"')
    before = re.search(r'"pid": (\d+)', page.locator("#models-health").inner_text())[1]
    page.click("#models-apply")  # the same model again: the workers restart over it
    expect(page.locator("#models-status")).to_contain_text("loaded qistudio-demo", timeout=2 * RUN_TIMEOUT)
    after = re.search(r'"pid": (\d+)', page.locator("#models-health").inner_text())[1]
    assert after != before


def test_train_start_stop_and_resume(page, ui, shots):
    output = ui[1]
    tab(page, "Train")
    page.click("#train-demo")
    expect(page.locator("#train-captions")).to_contain_text("a blue square on a white background")
    cell = page.locator("#train-captions [data-testid='cell-0-1']")
    cell.dblclick()
    editor = page.locator("#train-captions [data-testid='cell-0-1'] textarea, "
                          "#train-captions [data-testid='cell-0-1'] input").first
    editor.fill("a bright red circle")
    editor.press("Enter")
    page.click("#train-save")
    metadata = output / "train" / "demo_dataset" / "metadata.csv"
    deadline = time.monotonic() + 30
    while "a bright red circle" not in metadata.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = list(csv.DictReader(open(metadata, encoding="utf-8")))
    assert rows[0] == {"image": "00_red_circle.png", "prompt": "a bright red circle"} and len(rows) == 8
    page.fill("#train-name textarea", "tiny")
    for element, value in (("train-rank", 4), ("train-steps", 500), ("train-save-steps", 1), ("train-val-every", 2),
                           ("train-val-width", 64), ("train-val-height", 64), ("train-val-steps", 2)):
        number(page, element, value)
    page.fill("#train-val-prompt textarea", "a red circle")
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"step ([2-9]|\d\d+)/500"), timeout=180_000)
    expect(page.locator("#train-samples img").first).to_be_visible(timeout=60_000)  # step 2's validation image
    snap(page, shots, "train.png")
    page.click("#train-stop")
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=90_000)
    run = output / "train" / "tiny"
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "loss.csv", encoding="utf-8"))]
    assert steps[:2] == [1, 2] and steps[-1] < 500
    assert (run / "checkpoints").is_dir() and list((run / "samples").glob("step-*/00.png"))
    assert "qistudio: interrupted" in (run / "ui-train.log").read_text()
    # Resume continues from the last checkpoint (one per step here), then stops again.
    page.click("#train-resume")
    wait_for_step_past(page, steps[-1], seconds=180)
    page.click("#train-stop")
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=90_000)
    resumed = [int(r["step"]) for r in csv.DictReader(open(run / "loss.csv", encoding="utf-8"))]
    assert resumed == list(range(1, resumed[-1] + 1)) and resumed[-1] > steps[-1]  # no step lost or repeated
    assert "--- resumed ---" in (run / "ui-train.log").read_text()
