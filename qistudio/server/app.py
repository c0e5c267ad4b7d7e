"""The HTTP face: OpenAI's image endpoints, a jobs API with server-sent events, models, health and metrics.

Every route builds a JobSpec (fields.py) and submits it to the one engine; nothing here touches a model. Waiting
is asynchronous: a job's events reach the event loop through call_soon_threadsafe, so a thousand waiting requests
hold no thread. A synchronous request whose client goes away cancels its job. PNG encoding runs in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Engine, EngineError, Job, JobState, QueueFull
from ..validation import InputError
from . import errors
from .bodies import read_body
from .errors import APIError
from .fields import FIELDS, job_spec
from .metrics import registry_for
from .pngs import images_response
from .security import Guard
from .settings import ServerSettings

KEEPALIVE_SECONDS = 15.0
RENDERED_KEPT = 64  # finished jobs whose encoded response is kept for repeated GETs
FINAL_EVENTS = {state.value for state in JobState if state.finished}


def create_app(engine: Engine, settings: ServerSettings, own_engine: bool = True) -> FastAPI:
    """The ASGI app over a started engine (shut down with the app when `own_engine`)."""

    async def lifespan(app):
        yield
        if own_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="qistudio", summary="Qwen-Image over OpenAI's images API", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.limits.max_body_bytes)
    face = _Face(engine, settings)

    app.get("/health")(face.health)
    app.get("/metrics")(face.metrics)
    app.get("/v1/models")(face.models)
    app.get("/v1/loras")(face.loras)
    app.post("/v1/images/generations")(face.generations)
    app.post("/v1/images/edits")(face.edits)
    app.post("/v1/jobs", status_code=202)(face.create_job)
    app.get("/v1/jobs/{job_id}")(face.get_job)
    app.delete("/v1/jobs/{job_id}")(face.cancel_job)
    app.get("/v1/jobs/{job_id}/events")(face.job_events)
    return app


class _Face:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.registry = registry_for(engine)
        self.rendered: collections.OrderedDict[str, dict] = collections.OrderedDict()

    # --- plain reads -------------------------------------------------------------------------------------------

    async def health(self):
        report = self.engine.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        """The served model, with what jobs may name beside it: its family, ControlNets, and whether it splits
        images into layers (a Layered model, or one served beside it)."""
        spec = self.engine.config.model
        layers = spec.family == "qwen-image-layered" or spec.layered is not None
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model",
                                             "created": self.settings.created, "owned_by": "qistudio",
                                             "family": spec.family, "controlnets": list(spec.controlnet_names),
                                             "layers": layers}]}

    async def loras(self):
        return {"object": "list", "data": [{"id": name, "object": "lora"} for name in self.engine.loras.names()]}

    # --- OpenAI's endpoints ------------------------------------------------------------------------------------

    async def generations(self, request: Request):
        return await self._run(request, edit=False)

    async def edits(self, request: Request):
        return await self._run(request, edit=True)

    async def _run(self, request: Request, edit: bool):
        job = await self._submit(request, edit)
        await self._wait(job, request)
        if job.state is JobState.SUCCEEDED:
            return await self._rendered(job)
        raise _job_error(job)

    # --- jobs ----------------------------------------------------------------------------------------------------

    async def create_job(self, request: Request):
        job = await self._submit(request, edit=None)
        return {"object": "image.job", **job.summary()}

    async def get_job(self, job_id: str):
        job = self._job(job_id)
        out = {"object": "image.job", **job.summary()}
        if job.state is JobState.SUCCEEDED:
            out["result"] = await self._rendered(job)
        return out

    async def cancel_job(self, job_id: str):
        job = self.engine.cancel(job_id)
        if job is None:
            raise _no_job(job_id)
        return {"object": "image.job", **job.summary(), "cancel_requested": job.cancel_requested}

    async def job_events(self, job_id: str):
        job = self._job(job_id)
        return StreamingResponse(self._event_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _event_stream(self, job: Job):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        past, unsubscribe = job.events_and_subscribe(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            pending = collections.deque(past)
            while True:
                if not pending:
                    try:
                        pending.append(await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS))
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                event = dict(pending.popleft())
                if event.get("preview") is not None:
                    event["preview"] = base64.b64encode(event["preview"]).decode("ascii")
                else:
                    event.pop("preview", None)
                if event["type"] == JobState.SUCCEEDED.value:
                    event["result"] = await self._rendered(job)
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                if event["type"] in FINAL_EVENTS:
                    return
        finally:
            unsubscribe()

    # --- helpers -------------------------------------------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
        job = self.engine.job(job_id)
        if job is None:
            raise _no_job(job_id)
        return job

    async def _submit(self, request: Request, edit: bool | None) -> Job:
        # Files: the edit images, a mask, and as many entity masks.
        body = await read_body(request, max_files=2 * self.settings.limits.max_images_in + 1)
        if edit is None:  # POST /v1/jobs: an edit when it carries images
            edit = "image" in body
        spec = await job_spec(body, self.settings, edit)
        try:
            return await asyncio.to_thread(self.engine.submit, spec)
        except QueueFull as error:
            raise APIError(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after)})
        except (InputError, ValueError) as error:
            word = str(error).split(" ", 1)[0].rstrip(":")
            param = "controlnets" if word.startswith("blockwise") else word
            raise APIError(400, str(error), param=param if param in FIELDS or param.startswith("eligen") else None,
                           code="invalid_value") from None
        except EngineError as error:
            raise APIError(503, str(error), code="unavailable") from None

    async def _wait(self, job: Job, request: Request) -> None:
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()

        def on_event(event):
            if JobState(event["status"]).finished:
                loop.call_soon_threadsafe(finished.set)

        _, unsubscribe = job.events_and_subscribe(on_event)
        try:
            while not job.done:
                try:
                    await asyncio.wait_for(finished.wait(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(job.id)
                        return
        finally:
            unsubscribe()

    async def _rendered(self, job: Job) -> dict:
        if job.id not in self.rendered:
            self.rendered[job.id] = await asyncio.to_thread(images_response, job, self.settings,
                                                            self.engine.loras.path)
            while len(self.rendered) > RENDERED_KEPT:
                self.rendered.popitem(last=False)
        return self.rendered[job.id]


def _no_job(job_id: str) -> APIError:
    return APIError(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)", param="job_id",
                    code="job_not_found")


def _job_error(job: Job) -> APIError:
    if job.state is JobState.CANCELLED:
        if job.error is not None and job.error.code == "shutdown":
            return APIError(503, job.error.message, code="shutdown")
        return APIError(409, f"job {job.id} was cancelled", code="cancelled")
    error = job.error
    if error is None:  # not finished: the client went away and the job was cancelled
        return APIError(409, f"job {job.id} was cancelled", code="cancelled")
    return APIError(400 if error.user else 500, error.message, code=error.code)
