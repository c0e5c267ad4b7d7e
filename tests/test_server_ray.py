"""`qistudio serve --ray`: the same application on Ray Serve, on a local Ray cluster on the CPU with two worker
replicas and the demo model. Skipped where ray is not installed (pip install 'qistudio[ray]')."""

import concurrent.futures
import os
import signal

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'qistudio[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'qistudio[ray]')")

from server_harness import (START_TIMEOUT, alone, assert_same_image, decoded, health, post_job,  # noqa: E402
                            start_server, stop_server, wait_job)
from test_server import demo_cache, reference  # noqa: E402,F401 (fixtures)


@pytest.fixture(scope="module")
def ray_server(demo_cache):
    process, url = start_server(demo_cache, "--ray", "--device", "cpu", "--workers", "2", "--threads", "1",
                                "--max-steps", "5000", extra_env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    yield process, url
    stop_server(process)


@pytest.fixture(scope="module")
def url(ray_server):
    return ray_server[1]


def test_requests_spread_over_two_replicas_each_equal_to_pipe(url, reference):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    count = 8

    def call(i):
        response = client.images.generate(prompt=f"scene {i} " + "with trees " * i, size="64x64",
                                          extra_body={"seed": 50 + i, "num_inference_steps": 2})
        return decoded(response.data[0])

    with concurrent.futures.ThreadPoolExecutor(count) as executor:
        images = list(executor.map(call, range(count), timeout=600))
    for i, image in enumerate(images):
        assert_same_image(image, alone(reference, f"scene {i} " + "with trees " * i, seed=50 + i)[0])
    report = health(url)
    assert report["status"] == "ok" and [w["device"] for w in report["workers"]] == ["ray", "ray"]
    pids = {w["pid"] for w in report["workers"] if w["pid"]}
    assert pids, report  # the replicas introduced themselves


def test_jobs_and_cancellation_through_ray(url, reference):
    done = post_job(url, prompt="a ray of light", num_inference_steps=2, seed=8)
    final = wait_job(url, done["id"], lambda j: j["status"] == "succeeded")
    assert_same_image(decoded(final["result"]["data"][0]), alone(reference, "a ray of light", seed=8)[0])
    job = post_job(url, prompt="long", num_inference_steps=4000)
    wait_job(url, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    assert httpx.delete(f"{url}/v1/jobs/{job['id']}").json()["cancel_requested"]
    final = wait_job(url, job["id"], lambda j: j["status"] == "cancelled", timeout=60)
    assert final["progress"]["step"] < 4000


def test_a_killed_replica_is_noticed_and_its_job_retried(url, reference):
    job = post_job(url, prompt="outlive it", num_inference_steps=150, seed=31)
    running = wait_job(url, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    pid = health(url)["workers"][running["worker"]]["pid"]
    os.kill(pid, signal.SIGKILL)
    final = wait_job(url, job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=START_TIMEOUT)
    assert final["status"] == "succeeded" and final["attempts"] == 2, final
    assert_same_image(decoded(final["result"]["data"][0]),
                      alone(reference, "outlive it", seed=31, num_inference_steps=150)[0])
    assert health(url)["status"] == "ok"


def test_ctrl_c_stops_ray_cleanly(ray_server):
    process, _ = ray_server
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 0
