"""Images per hour through `qistudio serve` on one GPU, with and without batching, and through any other
OpenAI-compatible image server (vLLM-Omni, SGLang Diffusion) on the same card.

    python bench/serve.py --model Qwen/Qwen-Image --sizes 1024 1328 --batches 1 4 --requests 16
    python bench/serve.py --url http://127.0.0.1:8091/v1 --served-model Qwen/Qwen-Image --sizes 1024 1328
    python bench/serve.py --demo --sizes 64 --steps 2 --requests 8 --rounds 1   # plumbing check on the CPU

Method: for each max-batch setting one `qistudio serve` process (one worker) is started and warmed up with two
requests per size (compilation, allocator growth); then each round sends `--requests` requests at once (distinct
seeds, the same prompt length) through the official openai client and times from the first send to the last
image, as a client sees it: queueing, batching, PNG encoding and transfer included. Images per hour = requests /
that time. Cases that need another server (another max batch) cannot share the card with it, so they run one after
the other rather than interleaved; the spread over rounds says how much the card drifted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import caption, markdown_table, write_report  # noqa: E402

PROMPT = "A coffee shop entrance with a chalkboard sign reading 'Qwen Coffee', a neon light beside it, photographic"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    model = ["--demo"] if args.demo else ["--model", args.model]
    command = [sys.executable, "-m", "qistudio.cli.main", "serve", *model, "--port", str(port), "--workers", "1",
               "--max-batch", str(max_batch), "--max-queue", str(4 * args.requests), "--preview-every", "0",
               "--max-pixels", str(max(args.sizes) ** 2), *args.serve_args]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"qistudio serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, f"{url}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"qistudio serve did not start within {args.start_timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()


def burst(client, model: str, size: int, count: int, steps: int, first_seed: int) -> float:
    """Seconds from sending `count` requests at once to the last image."""
    def one(seed):
        response = client.images.generate(model=model, prompt=PROMPT, size=f"{size}x{size}",
                                          response_format="b64_json",
                                          extra_body={"seed": seed, "num_inference_steps": steps})
        assert response.data and response.data[0].b64_json

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as executor:
        list(executor.map(one, range(first_seed, first_seed + count)))
    return time.perf_counter() - start


def measure(args, url: str, model: str) -> dict[int, list[float]]:
    """Per size, images per hour of each round."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=args.api_key or "unused", max_retries=0, timeout=3600)
    for size in args.sizes:  # warm-up, untimed
        burst(client, model, size, 2, args.steps, 0)
    rates: dict[int, list[float]] = {size: [] for size in args.sizes}
    for round_index in range(args.rounds):
        for size in args.sizes:
            seconds = burst(client, model, size, args.requests, args.steps, 1000 * (round_index + 1))
            rates[size].append(args.requests * 3600 / seconds)
    return rates


def cell(samples: list[float]) -> str:
    if len(samples) == 1:
        return f"{samples[0]:.0f} (n=1)"
    return f"{statistics.median(samples):.0f} ({min(samples):.0f}-{max(samples):.0f}, n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen-Image", help="what `qistudio serve --model` loads")
    parser.add_argument("--demo", action="store_true", help="the tiny demo model (plumbing check)")
    parser.add_argument("--url", help="bench an already running OpenAI-compatible server instead (its /v1 URL)")
    parser.add_argument("--served-model", help="the model name to send to --url")
    parser.add_argument("--api-key", help="for --url")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1328])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="qistudio serve --max-batch values")
    parser.add_argument("--requests", type=int, default=16, help="requests sent at once per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--start-timeout", type=float, default=1800)
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                        help="the rest goes to qistudio serve (e.g. --fp8 --compile)")
    args = parser.parse_args()

    rows = []
    if args.url:
        rates = measure(args, args.url, args.served_model)
        rows.append([f"{args.url} ({args.served_model})", *(cell(rates[s]) for s in args.sizes)])
    else:
        for max_batch in args.batches:
            process, url = start_server(args, max_batch)
            try:
                rates = measure(args, url, "qistudio-demo" if args.demo else args.model)
            finally:
                stop_server(process)
            rows.append([f"qistudio serve --max-batch {max_batch}", *(cell(rates[s]) for s in args.sizes)])
    text = caption(f"Images per hour through an OpenAI-compatible server, {args.requests} requests sent at once per "
                   f"round, {args.steps} steps, guidance on (cfg 4, empty negative prompt).",
                   f"wall clock from the first request to the last image, {args.rounds} rounds after 2 warm-up "
                   "requests per size; median (min-max)")
    table = markdown_table(["server", *(f"{s}x{s} images/h" for s in args.sizes)], rows)
    write_report("serve.md", f"{text}\n\n{table}\n")


if __name__ == "__main__":
    main()
