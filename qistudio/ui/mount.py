"""The UI inside `qistudio serve`: mounted at /ui over the server's own engine (same queue, same workers).

Design note. The HTTP API sits behind its Guard middleware (the Bearer key, the body limit), which a browser
page cannot satisfy, so the UI is not mounted inside the API app: both are mounted side by side in an outer app,
the UI at /ui with Gradio's login page (user "qistudio", password the server's API key) when the server has a key,
the API at / exactly as before. The outer app runs the API app's lifespan, so the server still shuts its engine
down on exit. Without Gradio installed (the ui extra), the API is served alone, with a note.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

UI_PATH = "/ui"
UI_USER = "qistudio"


def with_ui(api, engine, settings, output_dir: str | None = None):
    """An ASGI app serving `api` at / and the UI at /ui; `api` itself when Gradio is not installed."""
    try:
        import gradio as gr
    except ImportError:
        print(f"note: the web UI is not served at {UI_PATH} (pip install 'qistudio[ui]')", file=sys.stderr)
        return api
    from fastapi import FastAPI

    from .app import build_blocks, launch_options
    from .context import EngineHolder, UIContext

    output = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="qistudio-ui-"))
    ctx = UIContext(EngineHolder(engine), output)  # no reload: the API's clients share these workers
    blocks = build_blocks(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with api.router.lifespan_context(api):
            yield
            ctx.training.shutdown()

    outer = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    auth = (UI_USER, settings.api_key) if settings.api_key else None
    gr.mount_gradio_app(outer, blocks, path=UI_PATH, auth=auth, max_file_size=settings.limits.max_body_bytes,
                        **launch_options(ctx))
    outer.mount("/", api)
    print(f"web UI at {UI_PATH}" + (f" (user {UI_USER}, the API key as password)" if auth else "")
          + f"; results in {output}", file=sys.stderr)
    return outer
