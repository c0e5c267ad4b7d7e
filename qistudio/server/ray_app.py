"""The same HTTP application as a Ray Serve deployment graph: one ingress, worker replicas that autoscale.

The ingress replica runs the very app of app.py over an Engine whose pool is the worker deployment
(engine.ray_pool): jobs, their events and batching stay in one place, so every route (the jobs API included)
behaves as on one machine. The worker deployment has a replica per GPU (or `threads` CPUs), between
`min_replicas` and `max_replicas`, scaled by Ray Serve on the requests waiting for a replica (one batch each).
LoRA folders, the model's files (or the demo folder) must be readable at the same paths on every node.
"""

from __future__ import annotations

from ..engine import Engine, EngineConfig
from ..engine.ray_pool import RayPool
from .app import create_app
from .settings import ServerSettings


class Ingress:
    """The ingress deployment: builds the engine over the worker handle, then the ASGI app (Ray Serve's
    deferred-app protocol, `__serve_build_asgi_app__`)."""

    def __init__(self, workers, config: EngineConfig, settings: ServerSettings, concurrency: int):
        pool = RayPool(workers, concurrency, config.max_batch_images)
        self.engine = Engine(config, workers=pool).start()
        self.settings = settings

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.settings)


def build(config: EngineConfig, settings: ServerSettings, min_replicas: int, max_replicas: int, gpus: bool,
          threads: int | None):
    """The Ray Serve application (for `serve.run`)."""
    from ray import serve

    from ..engine.ray_worker import RayWorker

    options = {"threads": threads, "preview_every": config.preview_every, "max_loras": config.max_loaded_loras}
    worker = serve.deployment(
        RayWorker, name="qistudio-worker", max_ongoing_requests=1,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": 1},
        ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": threads or 1},
    )  # fmt: skip
    ingress = serve.deployment(serve.ingress()(Ingress), name="qistudio", num_replicas=1,
                               max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(worker.bind(config.model, options), config, settings, max_replicas)
