"""`transferlab serve` under load: 16 concurrent HTTP clients send 2,000 single-image requests
(raw bytes, keep-alive connections), against the server with batching (requests arriving within
--max-wait-ms share one model call) and, side by side, with --max-batch 1 (one call each).
Prints throughput, p50/p99 latency and errors per setting; last line: `ratio=` (batched
throughput over unbatched).

    python benchmarks/serve_load.py [--run RUN] [--requests 2000] [--clients 16]

Without --run it trains a ResNet-18 at 64 px on the bundled digits for one epoch first.
"""

from __future__ import annotations

import argparse
import http.client
import io
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", "serve", str(run), "--port", str(port), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    for _ in range(240):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def load(port: int, images: list[bytes], requests: int, clients: int) -> dict:
    latencies, errors, lock = [], [0], threading.Lock()
    counter = iter(range(requests))

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for n in counter:  # shared: the clients together send `requests`
            body = images[(n + i) % len(images)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict?top_k=3", body=body,
                             headers={"Content-Type": "application/octet-stream"})  # fmt: skip
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - t0)
                errors[0] += not ok

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"rps": requests / wall, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99),
            "errors": errors[0], "wall": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run or ensemble folder [train a ResNet-18 on digits]")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = Path(args.run) if args.run else tmp / "r18"
    if not args.run:
        subprocess.run([sys.executable, "-m", "transferlab", "--quiet", "train", "--data", "digits",
                        "--model", "resnet18", "--input-size", "64", "--epochs", "1", "--out",
                        str(run)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    rng = np.random.default_rng(0)
    images = []
    for _ in range(64):  # photos-sized JPEGs the server must decode and resize
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
        images.append(buf.getvalue())
    print(f"{platform.processor() or platform.machine()}, {args.clients} clients, "
          f"{args.requests} requests of one 320x240 JPEG each, run {run}")  # fmt: skip
    results = {}
    for name, flags in (("batched (max-wait 5 ms)", ()), ("unbatched (max-batch 1)",
                        ("--max-batch", "1"))):  # fmt: skip
        proc, port = start(run, *flags)
        try:
            load(port, images, 64, args.clients)  # warm-up
            r = results[name] = load(port, images, args.requests, args.clients)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"{name:<26} {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
              f"errors {r['errors']}  ({r['wall']:.1f} s)")  # fmt: skip
    a, b = results.values()
    print(f"ratio={a['rps'] / b['rps']:.2f}")


if __name__ == "__main__":
    main()
