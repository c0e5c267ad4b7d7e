"""The engine every face (CLI, HTTP server, UI) submits to: a bounded job queue and worker processes.

    engine = Engine(EngineConfig(model=ModelSpec.from_configs("demo", configs, tokenizer_config), devices=("cpu",)))
    with engine:
        job = engine.submit(JobSpec({"prompt": "a cat", "height": 64, "width": 64, "seed": 1}))
        job.wait()
        job.result.images[0].save("cat.png")

engine.py holds the design note (scheduling, retries, shutdown); batching.py when jobs share a DiT call;
runner.py how a worker runs a batch; pool.py the processes.
"""

from .engine import Engine, EngineConfig, EngineError, QueueFull
from .jobs import Job, JobError, JobResult, JobState
from .models import ModelSpec
from .spec import JobSpec

__all__ = ["Engine", "EngineConfig", "EngineError", "Job", "JobError", "JobResult", "JobSpec", "JobState",
           "ModelSpec", "QueueFull"]
