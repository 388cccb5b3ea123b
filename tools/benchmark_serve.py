"""Images per second through serve.py's JSON API, end to end: upload, decode, transform, model, JSON.

    python tools/benchmark_serve.py --images 200 --per_request 8 --json serve_bench.json
    python tools/benchmark_serve.py --path_to_model_weight runs/demo/best.pth --serve_args "--threads 2"

Starts ``serve.py --port 0`` as a subprocess (its URL read from its first line), generates ``--images``
photo-like 1024x683 JPEGs in memory, posts one untimed request, then posts them all in requests of
``--per_request`` files from ``--clients`` client threads and prints images/s (images / wall time from
the first request to the last answer). Without ``--path_to_model_weight`` it serves a randomly initialised
TANet of ``--variant`` (the speed does not depend on the weights). ``--json`` writes the figures, the
server's settings and the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/benchmark_serve.py`
    sys.path.insert(0, str(REPO_DIR))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models import TANet, list_variants  # noqa: E402
from helpers.runtime import usable_cpus  # noqa: E402
from helpers.safe_io import atomic_save_json  # noqa: E402

SIZE = (1024, 683)  # width, height: a 3:2 photo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Images/s through serve.py's POST /api/score, end to end.")
    p.add_argument("--path_to_model_weight", default=None, help="checkpoint to serve (default: random weights)")
    p.add_argument("--variant", choices=list_variants(), default="tad66k", help="variant of the random weights")
    p.add_argument("--images", type=int, default=200, help="images to score (default: 200)")
    p.add_argument("--per_request", type=int, default=8, help="files per request (default: 8)")
    p.add_argument("--clients", type=int, default=1, help="client threads posting at once (default: 1)")
    p.add_argument("--serve_args", default="", help="more serve.py options, e.g. \"--threads 2 --slots 1\"")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


def photo_jpeg(seed: int) -> bytes:
    """A photo-like JPEG of SIZE: two colour gradients, a soft disc and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    pixels = a * (1 - x[..., None] / w) + b * (y[..., None] / h)
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * h
    disc = np.clip(1.5 - np.hypot(x - cx, y - cy) / r, 0, 1)[..., None]
    pixels = pixels * (1 - disc) + c * disc + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def machine() -> str:
    """The CPU in words: its model name, family/model, cores this process may use, AVX-512 or not."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    family = f", family {info['cpu family']} model {info['model']}" if "cpu family" in info else ""
    avx512 = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return f"{name}{family}, {usable_cpus()} cores, {avx512}; torch {torch.__version__}"


def start_server(weights: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port; (process, URL)."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--path_to_model_weight", str(weights), "--port", "0",
                             *extra], cwd=REPO_DIR, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at http" not in line:
        proc.wait(timeout=30)
        raise SystemExit(f"benchmark_serve.py: error: serve.py did not start (exit status {proc.returncode})")
    return proc, line.split(" at ", 1)[1].split(";", 1)[0]


def post(url: str, batch: list[tuple[str, bytes]]) -> float:
    """Seconds for one request; SystemExit if it fails or a file gets an error."""
    start = time.perf_counter()
    answer = requests.post(f"{url}/api/score", files=[("files", item) for item in batch], timeout=600)
    seconds = time.perf_counter() - start
    if answer.status_code != 200:
        raise SystemExit(f"benchmark_serve.py: error: HTTP {answer.status_code}: {answer.text[:300]}")
    failed = [row for row in answer.json()["results"] if row["error"]]
    if failed:
        raise SystemExit(f"benchmark_serve.py: error: {failed[0]['image']}: {failed[0]['error']}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.images, args.per_request, args.clients) < 1:
        raise SystemExit("benchmark_serve.py: error: --images, --per_request and --clients must be >= 1")
    images = [(f"photo_{i:04d}.jpg", photo_jpeg(i)) for i in range(args.images)]
    batches = [images[i:i + args.per_request] for i in range(0, len(images), args.per_request)]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.path_to_model_weight) if args.path_to_model_weight else Path(tmp) / "random.pth"
        if not args.path_to_model_weight:
            torch.manual_seed(0)
            torch.save({"model": TANet(args.variant).state_dict(), "variant": args.variant}, weights)
        extra = ["--max_files", str(args.per_request), "--queue", str(max(4, args.clients)),
                 *shlex.split(args.serve_args)]
        proc, url = start_server(weights, extra)
        try:
            info = requests.get(f"{url}/api/info", timeout=60).json()
            post(url, batches[0])  # untimed: the first forward pass sets up the model's kernels
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                latencies = list(pool.map(lambda batch: post(url, batch), batches))
            seconds = time.perf_counter() - start
            load_after = os.getloadavg()[0]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = {
        "images_per_s": args.images / seconds,
        "seconds": seconds,
        "images": args.images,
        "per_request": args.per_request,
        "clients": args.clients,
        "image_size": list(SIZE),
        "jpeg_kib_mean": statistics.mean(len(data) for _, data in images) / 1024,
        "request_seconds": {"median": statistics.median(latencies), "max": max(latencies)},
        "server": {k: info[k] for k in ("variant", "checkpoint", "device", "theme_fusion", "batch_size", "limits")},
        "serve_args": extra,
        "machine": machine(),
        "load_average_1min": {"before": load_before, "after": load_after},  # other work sharing the CPU
        "command": shlex.join(["python", "tools/benchmark_serve.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"{args.images} images of {SIZE[0]}x{SIZE[1]} (JPEG, {report['jpeg_kib_mean']:.0f} KiB on average) in "
          f"requests of {args.per_request} from {args.clients} client(s): {seconds:.1f} s, "
          f"{report['images_per_s']:.2f} images/s end to end (median request {statistics.median(latencies):.2f} s)")
    print(f"server: {info['variant']} on {info['device']}, batch size {info['batch_size']}; "
          f"machine: {report['machine']}; load average {load_before:.1f} before, {load_after:.1f} after")
    if args.json:
        atomic_save_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
