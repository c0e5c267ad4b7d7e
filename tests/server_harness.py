"""The loopback server the HTTP tests run: start `qistudio serve` on a free port and stop it, read its jobs, events,
health and metrics, and compare its images with pipe(...) run alone (tests/test_server.py, test_server_qwen21.py,
test_server_ray.py, test_ui_browser.py)."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_same_image(got, expected) -> None:
    """Equal as 8-bit images, up to batched GEMM rounding: no value more than one level off, almost none off."""
    diff = np.abs(pixels(got) - pixels(expected))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json if hasattr(item, "b64_json") else item["b64_json"])))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(cache: Path, *arguments: str, extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`qistudio serve --demo ARGUMENTS` on a free loopback port, once /health answers 200."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return start_server_command(["serve", "--demo", *arguments], env)


def start_server_command(arguments: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """`qistudio ARGUMENTS --port PORT` (a serve command) on a free loopback port, once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "qistudio.cli.main", *arguments, "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}): {process.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"the server did not start within {START_TIMEOUT} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def alone(pipe, prompt, **arguments) -> list[Image.Image]:
    """pipe(...) for one request, on one thread as each worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe(prompt, **{"height": 64, "width": 64, "num_inference_steps": 2, **arguments},
                   progress_bar_cmd=lambda s: s)
    finally:
        torch.set_num_threads(threads)
    return out if isinstance(out, list) else [out]


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_job(url, job_id, until, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there within {timeout} s: {job}")


def post_job(url, **body) -> dict:
    response = httpx.post(f"{url}/v1/jobs", json={"size": "64x64", **body}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def events(url, job_id) -> list[dict]:
    """The job's server-sent events until its last one."""
    out = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=180) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                out.append({"event": kind, **json.loads(line[len("data: "):])})
    return out


def metric_samples(url) -> dict[str, dict]:
    """/metrics read by prometheus_client's own parser: {sample name: {sorted label pairs: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def wait_workers_idle(url, timeout=START_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = health(url)
        if all(w["state"] == "idle" for w in report["workers"]):
            return report
        time.sleep(0.5)
    raise AssertionError(f"workers not idle within {timeout} s: {report}")
