"""The events that put a new picture into a gr.ImageEditor (EliGen's "New canvas", the Gallery's "use as inpaint
input") show no progress over the editor.

Why: Gradio 6 applies each of an event's status updates (queued, processing, complete) only after awaiting the
editor's get_data, which uploads its images; these awaits finish in any order, so a stale "processing" can land
after "complete" and its overlay then stays over the canvas and takes the user's strokes (EliGen then sends an
unpainted canvas: "the red entity has a prompt but no region"). tests/test_ui_browser.py paints on both editors.
"""

import pytest

pytest.importorskip("gradio", reason="the UI needs Gradio: pip install 'qistudio[ui]'")

from qistudio.engine import Engine, EngineConfig, ModelSpec  # noqa: E402
from qistudio.ui.app import build_blocks  # noqa: E402
from qistudio.ui.context import EngineHolder, UIContext  # noqa: E402


def test_events_that_replace_an_editors_picture_show_no_progress_over_it(tmp_path):
    spec = ModelSpec("qistudio-demo", (), extra={"demo": True, "model": None})
    ctx = UIContext(EngineHolder(Engine(EngineConfig(model=spec))), tmp_path / "out")  # configured, not started
    config = build_blocks(ctx).get_config_file()
    elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    editors = {c["id"] for c in config["components"] if c["type"] == "imageeditor"}
    writers = {elem_ids[d["targets"][0][0]]: d["show_progress"] for d in config["dependencies"]
               if editors & set(d["outputs"])}
    assert writers == {"eligen-new-canvas": "hidden", "gallery-to-inpaint": "hidden"}
