"""Speed of TANet's training and evaluation paths and of the input pipeline, with and without the cache.

    python tools/benchmark.py --batch_size 40 --steps 3 --json bench.json
    python tools/benchmark.py --device cuda --largest_batch 256 --json bench_gpu.json
    python tools/benchmark.py --accuracy --json bench.json     # also: how far each path moves SRCC/PLCC

Model paths are named by the options they use, joined by '+': ``fp32`` (the plain float32 path, the
reference computation, through this project's training and evaluation loops), ``reference`` (the same
model in the body of the reference script's loops: zero_grad, forward, MSE, backward, Adam step; or
``no_grad`` forward), ``channels_last``, ``bf16``, ``fp16`` (CUDA), ``compile`` (torch.compile),
``freeze`` (with compile: inductor's weight freezing, inference only), ``foldbn`` (BatchNorm folded into the
convolutions, inference only), ``fuse`` (with foldbn, CPU: each convolution runs with its activation and
residual sum fused in, oneDNN) and ``isolated`` (evaluation with theme_fusion="isolated", which skips the
theme ResNet: scores differ from the reference by design).
Every path is timed on the same synthetic batch: ``--warmup`` untimed steps each, then ``--steps``
timed rounds in which every path runs one step in turn (so a shared machine's changing load hits all
paths alike; CUDA: synchronised); images/s is batch / median step time.  The input pipeline is timed in one
thread (images/s per core) on generated JPEGs: decode + reference transform + collate, against cache
read + collate + crop/flip/normalise.  Prints a table and writes JSON:
``{"train": {path: img/s}, "eval": {path: img/s}, "data": {"uncached": img/s/core, "cached": img/s/core},
"machine": str, "reference": {"train": img/s, "eval": img/s}, ...}`` plus details (peak memory, step
times, cache build rate, accuracy); the ``reference`` path is reported apart, as its name is not options.
On the CPU this process runs with ``--allocator tuned`` (as main_nni.py and predict.py do by default); the
``reference`` path then runs in a child process with the system allocator, as the reference script runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/benchmark.py`
    sys.path.insert(0, str(REPO_DIR))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from imagedata.augment import augment_batch  # noqa: E402
from imagedata.cache import CachedDataset, build_cache  # noqa: E402
from dataset import ScoreImageDataset  # noqa: E402
from imagedata.demo_data import GenerationError  # noqa: E402
from training.engine import infer, make_loader, train_one_epoch  # noqa: E402
from models import TANet, conv_fusion_available, fold_batchnorm, fuse_conv_activations  # noqa: E402
from helpers.runtime import (  # noqa: E402
    ALLOCATORS, amp_dtype, cpu_has_native_bf16, resolve_device, seed_everything, tune_cpu_allocator, usable_cpus)
from helpers.safe_io import atomic_save_json, atomic_torch_save  # noqa: E402

TOKENS = ("compile", "freeze", "isolated", "foldbn", "fuse", "bf16", "fp16", "channels_last")
CUDA_TRAIN = ("reference", "fp32", "channels_last", "bf16", "bf16+channels_last", "fp16", "fp16+channels_last")
CUDA_EVAL = CUDA_TRAIN + ("foldbn+fp16+channels_last", "isolated", "isolated+foldbn+fp16+channels_last")


def cpu_paths(*, train: bool) -> list[str]:
    """The default CPU paths: bf16 ones only on a CPU with bfloat16 instructions (elsewhere bf16 is an
    emulation, about 10x slower); onnx when onnxruntime is installed."""
    low = "bf16+" if cpu_has_native_bf16() else ""
    names = ["reference", "fp32", "channels_last"] + (["bf16", "bf16+channels_last"] if low else [])
    if train:
        return names
    # fused convolutions in bf16 need the instructions themselves (TANET_CPU_BF16=1 only emulates bf16)
    fuse = "fuse+" if conv_fusion_available(amp_dtype("bf16" if low else "none")) else ""
    names += [f"foldbn+{low}channels_last", f"foldbn+{fuse}{low}channels_last", "isolated",
              f"isolated+foldbn+{fuse}{low}channels_last"]
    names = list(dict.fromkeys(names))
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        names.append("onnx")
    return names


@dataclass(frozen=True)
class ModelPath:
    """One way of running the model, parsed from its name."""

    name: str
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    freeze: bool = False
    isolated: bool = False
    fold_bn: bool = False
    fuse: bool = False
    reference_loop: bool = False
    onnx: bool = False


def parse_path(name: str, device: torch.device, *, train: bool) -> ModelPath:
    """``bf16+channels_last`` -> ModelPath; ValueError naming what cannot work."""
    tokens = name.split("+")
    if tokens == ["fp32"]:
        return ModelPath(name)
    if tokens == ["reference"]:
        return ModelPath(name, reference_loop=True)
    if tokens == ["onnx"]:
        if train or device.type != "cpu":
            raise ValueError(f"path {name!r}: onnx (an isolated export run by onnxruntime) is a CPU evaluation path")
        return ModelPath(name, isolated=True, onnx=True)
    unknown = [t for t in tokens if t not in TOKENS]
    if unknown or len(set(tokens)) != len(tokens):
        raise ValueError(f"path {name!r}: unknown or repeated part(s) {unknown or tokens}; "
                         "parts: fp32 or reference alone, "
                         f"or {', '.join(TOKENS)} joined by '+'")
    if "bf16" in tokens and "fp16" in tokens:
        raise ValueError(f"path {name!r}: choose one of bf16 and fp16")
    if "fp16" in tokens and device.type != "cuda":
        raise ValueError(f"path {name!r}: fp16 needs CUDA (use bf16 on the CPU)")
    if "freeze" in tokens and ("compile" not in tokens or train):
        raise ValueError(f"path {name!r}: freeze is for evaluation, with compile")
    if "isolated" in tokens and train:
        raise ValueError(f"path {name!r}: isolated is an evaluation path (training uses batch fusion)")
    if "foldbn" in tokens and train:
        raise ValueError(f"path {name!r}: foldbn is an evaluation path (folded BatchNorm cannot train)")
    if "fuse" in tokens and ("foldbn" not in tokens or device.type != "cpu"):
        raise ValueError(f"path {name!r}: fuse is a CPU evaluation path, with foldbn")
    if "fuse" in tokens and "bf16" in tokens and not conv_fusion_available(torch.bfloat16):
        raise ValueError(f"path {name!r}: this CPU cannot run oneDNN's fused convolutions in bf16 (no AVX-512)")
    amp = "bf16" if "bf16" in tokens else "fp16" if "fp16" in tokens else "none"
    return ModelPath(name, amp, "channels_last" in tokens, "compile" in tokens, "freeze" in tokens,
                     "isolated" in tokens, "foldbn" in tokens, "fuse" in tokens)


# --------------------------------------------------------------------------- measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while the block runs, in MiB: CUDA allocated memory, or this process's RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, float("nan")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss()) / 2**20


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


@contextlib.contextmanager
def inductor_freezing(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


def build_model(path: ModelPath, device: torch.device, state: dict | None = None) -> tuple[TANet, torch.nn.Module]:
    """(model, the module to call): the same weights for every path; an isolated path builds no theme
    network (as isolated scoring does); ``onnx``: the isolated model exported and run by onnxruntime."""
    seed_everything(0)
    model = TANet("tad66k")
    if state is not None:
        model.load_state_dict(state)
    if path.onnx:  # the export takes a whole checkpoint and builds the isolated model itself
        return model, exported(model)
    if path.isolated:
        theme_network = ("res365_last.", "hypernet.", "tygertnet.")
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(theme_network)}
        model = TANet("tad66k", theme_fusion="isolated", theme_network=False)
        model.load_state_dict(state)
    model.freeze_theme_backbone()
    if path.fold_bn:
        model = fold_batchnorm(model)
    if path.fuse:
        model = fuse_conv_activations(model, amp_dtype(path.amp))
    model.to(device)
    if path.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, (torch.compile(model) if path.compile else model)


def exported(model: TANet) -> Callable:
    """The model exported to ONNX (in a temporary folder) and loaded into onnxruntime."""
    from scoring.onnx_export import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.pth"
        atomic_torch_save({"model": model.state_dict(), "variant": model.variant}, checkpoint)
        export_onnx(checkpoint, Path(folder) / "model.onnx")
        return OnnxModel(Path(folder) / "model.onnx")  # the session holds the graph: the file may go


def synthetic_batch(batch_size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(batch_size)
    image = torch.randn(batch_size, 3, 224, 224, generator=g)
    if device.type == "cuda":
        image = image.pin_memory()
    return {"image": image, "target": torch.rand(batch_size, 1, generator=g), "index": torch.arange(batch_size),
            "path": [f"img{i}" for i in range(batch_size)], "theme": [""] * batch_size}


class Runner:
    """One path's model, optimizer and batch, and its step (one training step or one evaluation pass)."""

    def __init__(self, path: ModelPath, *, train: bool, batch_size: int, device: torch.device) -> None:
        self.path, self.train, self.batch_size, self.device = path, train, batch_size, device
        self.batch = synthetic_batch(batch_size, device)
        self.model, self.net = build_model(path, device)
        self.times: list[float] = []
        self.peak_mb = float("nan")
        if train:
            self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
            self.scaler = torch.amp.GradScaler("cuda") if path.amp == "fp16" else None

    def step(self) -> None:
        p = self.path
        if p.reference_loop:
            self.reference_step()
            return
        if p.onnx:
            self.net(self.batch["image"])
            return
        with inductor_freezing(p.freeze):
            if self.train:
                train_one_epoch(self.net, [self.batch], self.optimizer, torch.nn.MSELoss(), self.device, amp=p.amp,
                                scaler=self.scaler, channels_last=p.channels_last, progress=False)
            else:
                infer(self.net, [self.batch], self.device, amp=p.amp, channels_last=p.channels_last, progress=False)

    def reference_step(self) -> None:
        """The body of the reference script's training or test loop, on the plain float32 model."""
        x, y = self.batch["image"].to(self.device), self.batch["target"].to(self.device)
        if self.train:
            self.model.train()
            self.optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            loss.backward()
            self.optimizer.step()
        else:
            self.model.eval()
            with torch.no_grad():
                self.model(x)

    def timed_step(self) -> None:
        with PeakMemory(self.device) as memory:
            self.times += time_steps(self.step, self.device, 1, 0)
        self.peak_mb = memory.peak_mb if self.peak_mb != self.peak_mb else max(self.peak_mb, memory.peak_mb)

    def result(self) -> dict:
        return {"images_per_s": self.batch_size / statistics.median(self.times),
                "images_per_s_best": self.batch_size / min(self.times), "step_s": self.times,
                "peak_memory_mb": self.peak_mb}


def measure_paths(paths: list[ModelPath], *, train: bool, batch_size: int, device: torch.device, steps: int,
                  warmup: int, log=lambda msg: None) -> tuple[dict, dict]:
    """({name: result}, {name: error}): every path warmed up, then their timed steps interleaved
    (round r times step r of every path), so a change of the machine's load hits all paths alike."""
    runners, errors = {}, {}
    kind = "train" if train else "eval"
    for path in paths:
        started = time.perf_counter()
        try:
            runner = Runner(path, train=train, batch_size=batch_size, device=device)
            for _ in range(max(warmup, 2) if path.compile else warmup):
                runner.step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing path must not lose the others
            errors[path.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"  {kind} {path.name}: FAILED ({errors[path.name]})")
            continue
        runners[path.name] = runner
        log(f"  {kind} {path.name}: warmed up in {time.perf_counter() - started:.0f} s")
    for _ in range(steps):
        for runner in runners.values():
            runner.timed_step()
    results = {name: runner.result() for name, runner in runners.items()}
    for name, r in results.items():
        log(f"  {kind} {name}: {r['images_per_s']:.1f} img/s (steps {', '.join(f'{t:.2f}' for t in r['step_s'])} s; "
            f"peak {r['peak_memory_mb']:.0f} MiB)")
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, errors


def run_paths(names: list[str], *, train: bool, args, device: torch.device, log) -> tuple[dict, dict]:
    here = [n for n in names if not (n == "reference" and args.allocator_tuned)]
    paths = [parse_path(name, device, train=train) for name in here]
    results, errors = measure_paths(paths, train=train, batch_size=args.batch_size, device=device, steps=args.steps,
                                    warmup=args.warmup, log=log)
    if len(here) < len(names):
        results_ref, errors_ref = measure_in_child("reference", train=train, args=args, log=log)
        results, errors = {**results_ref, **results}, {**errors_ref, **errors}
    details = {name: results[name] if name in results else {"error": errors[name]} for name in names}
    return {name: results[name]["images_per_s"] for name in names if name in results}, details


def measure_in_child(name: str, *, train: bool, args, log) -> tuple[dict, dict]:
    """One path measured in a child process with glibc's default allocator, as the reference script
    runs (this process's tuned allocator would speed the reference up): ({name: result}, {name: error})."""
    kind = "train" if train else "eval"
    with tempfile.TemporaryDirectory(prefix="tanet-bench-ref-") as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--allocator", "system",
               "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--skip", "data", "eval" if train else "train", "--paths" if train else "--eval_paths", name,
               "--json", str(out), *(["--threads", str(args.threads)] if args.threads else [])]
        log(f"  {kind} {name}: in a child process with the system allocator")
        child = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if child.returncode != 0 or not out.is_file():
            lines = child.stderr.strip().splitlines()
            error = f"child process failed ({child.returncode}): {lines[-1] if lines else ''}"
            log(f"  {kind} {name}: FAILED ({error})")
            return {}, {name: error}
        detail = json.loads(out.read_text())["details"][kind][name]
    if "error" in detail:
        return {}, {name: detail["error"]}
    log(f"  {kind} {name}: {detail['images_per_s']:.1f} img/s (child process, system allocator)")
    return {name: {**detail, "process": "child, system allocator"}}, {}


def largest_batch(name: str, *, train: bool, args, device: torch.device, log) -> dict:
    """The path's speed at the largest batch <= --largest_batch that fits (halving on out-of-memory)."""
    size = args.largest_batch
    path = parse_path(name, device, train=train)
    while size >= args.batch_size:
        try:
            results, errors = measure_paths([path], train=train, batch_size=size, device=device, steps=args.steps,
                                            warmup=args.warmup)
            if errors:
                return {"batch_size": size, "path": name, "error": errors[name]}
            log(f"  {'train' if train else 'eval'} {name} at batch {size}: {results[name]['images_per_s']:.1f} img/s")
            return {"batch_size": size, "path": name, **results[name]}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    return {"batch_size": None, "path": name, "error": "out of memory down to --batch_size"}


# --------------------------------------------------------------------------- input pipeline

def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """n photo-like JPEGs (smooth colour fields plus grain, quality 90) and their CSV; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    rows = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"b{i:04d}.jpg", quality=90)
        rows.append(f"b{i:04d}.jpg,{1 + 9 * rng.random():.2f}\n")
    csv = folder / "images.csv"
    csv.write_text("image,score\n" + "".join(rows), encoding="utf-8")
    return csv


def _rate(step: Callable[[], int], min_seconds: float) -> float:
    """images/s of repeated calls (each returns how many images it did) over at least min_seconds."""
    step()  # warm up: file cache, allocator
    done, started = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def bench_data(args, work: Path, device: torch.device, log) -> dict:
    """images/s per core of the training and evaluation input pipelines, uncached and cached (whose
    crop, flip and normalisation run on the device, as in training)."""
    csv = make_jpegs(work / "jpegs", args.data_images, tuple(args.image_size))
    batch = min(args.batch_size, args.data_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: everything below in this one thread
    result: dict = {}
    try:
        for train in (True, False):
            ds = ScoreImageDataset(csv, csv.parent, train=train)
            started = time.perf_counter()
            build_cache(ds, work / f"cache_{train}", workers=None, progress=False)
            build_rate = len(ds) / (time.perf_counter() - started)
            cached = CachedDataset(ds, work / f"cache_{train}")
            batches = [list(range(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)]

            def uncached_pass() -> int:
                for rows in batches:
                    default_collate([ds[i] for i in rows])
                return len(ds)

            def cached_pass() -> int:  # as engine.prepare_images: crop, flip, normalise on the device
                for rows in batches:
                    images = default_collate([cached[i] for i in rows])["image"]
                    augment_batch(images.to(device, non_blocking=True), train=train)
                synchronize(device)
                return len(ds)

            key = "train" if train else "eval"
            result[key] = {"uncached": _rate(uncached_pass, args.data_seconds),
                           "cached": _rate(cached_pass, args.data_seconds),
                           "cache_build_all_cores": build_rate}
            log(f"  data {key}: uncached {result[key]['uncached']:.1f}, cached {result[key]['cached']:.1f} img/s "
                f"per core ({result[key]['cached'] / result[key]['uncached']:.0f}x); cache build "
                f"{build_rate:.1f} img/s on all cores")
    finally:
        torch.set_num_threads(threads)
    return result


# --------------------------------------------------------------------------- accuracy

def bench_accuracy(args, device: torch.device, train_names: list[str], eval_names: list[str], work: Path,
                   log) -> dict:
    """Train TANet briefly on the demo data (fp32 and each of train_names), then evaluate: the fp32
    checkpoint with every evaluation path, and every checkpoint in fp32; SRCC/PLCC and deltas."""
    from imagedata.demo_data import ensure_demo_dataset

    n_train, n_test = args.accuracy_images
    root = ensure_demo_dataset(Path(args.demo_root) if args.demo_root else work / "demo", n_train=n_train,
                               n_test=n_test)
    data = {}
    for split, train in (("train", True), ("test", False)):
        ds = ScoreImageDataset(root / "merge" / f"{split}.csv", root / "images", train=train)
        build_cache(ds, work / f"demo_{split}", workers=None, progress=False)
        data[split] = CachedDataset(ds, work / f"demo_{split}")

    def evaluate(state: dict, name: str) -> tuple[dict, np.ndarray]:
        path = parse_path(name, device, train=False)
        model, net = build_model(path, device, state)
        loader = make_loader(data["test"], batch_size=args.batch_size, train=False, num_workers=0, device=device)
        with inductor_freezing(path.freeze):
            preds = infer(net, loader, device, amp=path.amp, channels_last=path.channels_last, progress=False)
        metrics = preds.metrics("tad66k", per_theme=False)
        return {"srcc": metrics["srcc"], "plcc": metrics["plcc"]}, preds.scores("tad66k")[0]

    def train(name: str) -> dict:
        path = parse_path(name, device, train=True)
        model, net = build_model(path, device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.accuracy_lr)
        scaler = torch.amp.GradScaler("cuda") if path.amp == "fp16" else None
        started = time.perf_counter()
        for epoch in range(args.accuracy_epochs):
            loader = make_loader(data["train"], batch_size=args.accuracy_train_batch, train=True, num_workers=0,
                                 device=device, epoch=epoch)
            train_one_epoch(net, loader, optimizer, torch.nn.MSELoss(), device, epoch=epoch, amp=path.amp,
                            scaler=scaler, channels_last=path.channels_last, progress=False)
        log(f"  accuracy: trained {name} for {args.accuracy_epochs} epoch(s) in {time.perf_counter() - started:.0f} s")
        return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    if args.accuracy_checkpoint:
        states = {"fp32": torch.load(args.accuracy_checkpoint, map_location="cpu", weights_only=True)}
    else:
        states = {"fp32": train("fp32")}
        if args.accuracy_save:
            atomic_torch_save(states["fp32"], args.accuracy_save)
    ref, ref_scores = evaluate(states["fp32"], "fp32")
    out: dict = {"setup": {"train_images": n_train, "test_images": n_test, "epochs": args.accuracy_epochs,
                           "lr": args.accuracy_lr, "train_batch_size": args.accuracy_train_batch,
                           "eval_batch_size": args.batch_size, "checkpoint": args.accuracy_checkpoint or "trained here",
                           "fp32": ref}, "eval": {}, "train": {}}
    log(f"  accuracy fp32: SRCC {ref['srcc']:.4f}, PLCC {ref['plcc']:.4f}")

    def deltas(metrics: dict, scores: np.ndarray) -> dict:
        return {**metrics, "abs_delta_srcc": abs(metrics["srcc"] - ref["srcc"]),
                "abs_delta_plcc": abs(metrics["plcc"] - ref["plcc"]),
                "max_abs_delta_score": float(np.max(np.abs(scores - ref_scores)) * 10.0)}  # on the 1..10 scale

    for name in eval_names:
        if name not in ("fp32", "reference"):  # the reference loop computes what fp32 computes
            try:
                out["eval"][name] = deltas(*evaluate(states["fp32"], name))
            except Exception as exc:  # noqa: BLE001
                out["eval"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    for name in train_names:
        if name not in ("fp32", "reference"):  # the reference loop computes what fp32 computes
            out["train"][name] = deltas(*evaluate(train(name), "fp32"))
    for kind in ("eval", "train"):
        for name, r in out[kind].items():
            if "srcc" in r:
                log(f"  accuracy {kind} {name}: SRCC {r['srcc']:.4f} (|d| {r['abs_delta_srcc']:.4f}), "
                    f"PLCC {r['plcc']:.4f} "
                    f"(|d| {r['abs_delta_plcc']:.4f}), max |d score| {r['max_abs_delta_score']:.4f}")
    return out


# --------------------------------------------------------------------------- report

def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = usable_cpus()
    text = f"{cpu}, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {text}"
    return text


def table(report: dict) -> str:
    ref = report["reference"]
    train, evals = ({**report[kind], **({"reference": ref[kind]} if kind in ref else {})} for kind in ("train", "eval"))
    details = report["details"]
    lines = [f"machine: {report['machine']}",
             f"device {report['device']}, batch {report['batch_size']}, median of {report['steps']} timed steps, "
             f"allocator {report.get('allocator', 'system')} (the reference path: system)",
             f"{'path':40s} {'train img/s':>11s} {'x fp32':>6s} {'x ref':>6s} {'peak MiB':>8s}   {'eval img/s':>10s} "
             f"{'x fp32':>6s} {'x ref':>6s} {'peak MiB':>8s}"]

    def cell(speeds: dict, kind: str, name: str) -> str:
        if name not in speeds:
            return f"{'failed' if name in details[kind] else '-':>11s} {'':>6s} {'':>6s} {'':>8s}"
        ratios = [f"{speeds[name] / speeds[b]:.2f}" if b in speeds else "" for b in ("fp32", "reference")]
        return f"{speeds[name]:11.1f} {ratios[0]:>6s} {ratios[1]:>6s} {details[kind][name]['peak_memory_mb']:8.0f}"

    for name in dict.fromkeys([*details["train"], *details["eval"]]):
        lines.append(f"{name:40s} {cell(train, 'train', name)}   {cell(evals, 'eval', name)}")
    data = report.get("data_detail")
    if data:
        for kind in ("train", "eval"):
            d = data[kind]
            w, h = report["image_size"]
            lines.append(f"input pipeline ({kind}, {w}x{h} JPEG, per core): "
                         f"uncached {d['uncached']:.1f} img/s, cached {d['cached']:.1f} img/s "
                         f"({d['cached'] / d['uncached']:.1f}x); cache build {d['cache_build_all_cores']:.1f} img/s "
                         f"on all cores")
    for key in ("largest_batch_train", "largest_batch_eval"):
        if key in report:
            r = report[key]
            lines.append(f"{key.replace('_', ' ')}: {r['path']} at batch {r['batch_size']}: "
                         + (f"{r['images_per_s']:.1f} img/s, peak {r['peak_memory_mb']:.0f} MiB" if "images_per_s" in r
                            else r.get("error", "")))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark TANet's training and evaluation paths and the input pipeline.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch_size", type=int, default=40)
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path (compile paths: at least 2)")
    p.add_argument("--paths", nargs="+", default=None, help="training paths (default: per device)")
    p.add_argument("--eval_paths", nargs="+", default=None, help="evaluation paths (default: per device)")
    p.add_argument("--image_size", type=int, nargs=2, default=(1024, 683), metavar=("W", "H"),
                   help="size of the generated JPEGs of the input-pipeline benchmark")
    p.add_argument("--data_images", type=int, default=40, help="generated JPEGs")
    p.add_argument("--data_seconds", type=float, default=3.0, help="time each input pipeline for at least this long")
    p.add_argument("--largest_batch", type=int, default=None,
                   help="also time the fastest training and evaluation path at this batch (halved until it fits)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--allocator", choices=ALLOCATORS, default="tuned",
                   help="CPU memory allocator of this process: tuned (as main_nni.py and predict.py run by default) "
                        "or system; the reference path always runs with the system one (in a child process "
                        "when this one is tuned)")
    p.add_argument("--skip", nargs="+", choices=("train", "eval", "data"), default=[], help="parts to leave out")
    p.add_argument("--accuracy", action="store_true",
                   help="also train briefly on the demo data and report how far each path moves SRCC/PLCC")
    p.add_argument("--accuracy_images", type=int, nargs=2, default=(480, 160), metavar=("TRAIN", "TEST"))
    p.add_argument("--accuracy_epochs", type=int, default=2)
    p.add_argument("--accuracy_lr", type=float, default=1e-3)
    p.add_argument("--accuracy_train_batch", type=int, default=16, help="training batch of --accuracy "
                   "(evaluation uses --batch_size)")
    p.add_argument("--accuracy_checkpoint", default=None,
                   help="evaluate this fp32-trained state dict (from --accuracy_save) instead of training one")
    p.add_argument("--accuracy_save", default=None, help="save the fp32-trained state dict here")
    p.add_argument("--accuracy_train_paths", nargs="+", default=None,
                   help="train with these paths too and evaluate in fp32 (default: the fastest non-compile "
                        "training path measured; none with --accuracy_checkpoint)")
    p.add_argument("--demo_root", default=None, help="demo data folder for --accuracy (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    e2e = p.add_argument_group("scoring a photo library end to end (--predict)")
    e2e.add_argument("--predict", action="store_true",
                     help="instead of the model paths: time predict.py end to end, as a child process, on generated "
                          "JPEGs of --image_size: one photo, --images photos and --images_small photos")
    e2e.add_argument("--images", type=int, default=1000, help="photos of the large run")
    e2e.add_argument("--images_small", type=int, default=100,
                     help="photos of the small run: (large - small) / (time difference) is the steady state")
    e2e.add_argument("--repeats", type=int, default=1, help="runs of each size; the median time counts")
    e2e.add_argument("--predict_args", default="", help="more options for predict.py, e.g. '--draft'")
    e2e.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local"],
                     help="also time the large run with these predict.py --engine values (ray: a local Ray, "
                          "pip install -r requirements-scale.txt); the peak memory is predict.py's process only")
    e2e.add_argument("--library", type=int, default=0, metavar="N",
                     help="also score a library of N tiny 32x32 JPEGs into a CSV with each of --engines: images/s "
                          "and peak memory (which stays flat in N)")
    e2e.add_argument("--light_python", default=None, metavar="PYTHON",
                     help="also time one photo scored with an .onnx export under this interpreter: a venv made "
                          "from requirements-score.txt (no torch), or 'same' for this one")
    e2e.add_argument("--compare_with", nargs="+", default=[], metavar="LABEL=DIR",
                     help="also time the predict.py of these other checkouts (e.g. before=../old, a worktree of an "
                          "earlier commit) on the same photos, interleaved with this one")
    return p


def predict_run(repo: Path, photos: Path, checkpoint: Path, out: Path, extra: str,
                python: str = sys.executable) -> tuple[float, float, str]:
    """(wall seconds, peak resident MiB, stderr) of one ``predict.py`` child process over ``photos``."""
    cmd = [python, str(repo / "predict.py"), str(photos), "--path_to_model_weight", str(checkpoint),
           "--output", str(out), "--quiet", *shlex.split(extra)]
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=devnull, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1:] or err}")
    return seconds, usage.ru_maxrss / 1024, err


def bench_predict(args, work: Path, log) -> dict:
    """predict.py end to end (start-up included) on generated photos: one photo's wall time, the images/s of
    the large run, and the steady state from the large and small runs; for this checkout and the others."""
    (work / "pool").mkdir(exist_ok=True)
    w, h = args.image_size
    rng = np.random.default_rng(0)
    for i in range(50):  # smooth random photos: JPEG sizes and decoding times like camera pictures
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(work / "pool" / f"photo_{i:02d}.jpg",
                                                                            quality=90)
    photos = {}
    for n in sorted({1, args.images_small, args.images}):
        folder = work / f"photos_{n}"
        folder.mkdir()
        for i in range(n):
            os.link(work / "pool" / f"photo_{i % 50:02d}.jpg", folder / f"photo_{i:05d}.jpg")  # one file, many names
        photos[n] = folder
    seed_everything(0)
    checkpoint = work / "tanet.pth"
    atomic_torch_save({"model": TANet("tad66k").state_dict(), "variant": "tad66k"}, checkpoint)
    checkouts = {"this": REPO_DIR}
    for item in args.compare_with:
        label, _, folder = item.partition("=")
        checkouts[label] = Path(folder).resolve()
    runs: dict[str, dict[int, list]] = {label: {n: [] for n in photos} for label in checkouts}
    log(f"predict.py end to end: {', '.join(map(str, photos))} photos of {w}x{h}, {args.repeats} run(s) each, "
        f"checkouts {', '.join(checkouts)}")
    for _ in range(args.repeats):
        for n, folder in photos.items():  # interleaved: a change of the machine's load hits every checkout alike
            for label, repo in checkouts.items():
                extra = args.predict_args if label == "this" else ""
                seconds, peak, err = predict_run(repo, folder, checkpoint, work / f"out_{label}_{n}.csv", extra)
                runs[label][n].append((seconds, peak))
                log(f"  {label}: {n} photos in {seconds:.2f} s, peak {peak:.0f} MiB")
                if label == "this" and n == 1:
                    path_line = next((line for line in err.splitlines() if "theme fusion" in line), "")
    result = {"photos": list(photos), "image_size": [w, h], "predict_args": args.predict_args,
              "path": path_line, "checkouts": {}}
    large, small = args.images, args.images_small
    for label, by_n in runs.items():
        median = {n: statistics.median(s for s, _ in by_n[n]) for n in by_n}
        result["checkouts"][label] = {
            "one_photo_s": median[1], "large_s": median[large], "small_s": median[small],
            "end_to_end_images_per_s": large / median[large],
            "steady_images_per_s": (large - small) / (median[large] - median[small]),
            "peak_memory_mb": {str(n): max(p for _, p in by_n[n]) for n in by_n},
        }
    result["engines"] = bench_engines(args, work, photos[large], checkpoint, log)
    if args.light_python:
        result["light"] = bench_light(args, work, photos[1], checkpoint, log)
    if "ray" in args.engines and "this" in result["checkouts"]:  # local: the large run above
        this = result["checkouts"]["this"]
        result["engines"][f"{large} photos, local"] = {
            "images": large, "seconds": this["large_s"], "images_per_s": this["end_to_end_images_per_s"],
            "peak_memory_mb": this["peak_memory_mb"][str(large)]}
    if "this" in result["checkouts"]:
        for label in checkouts:
            if label != "this":
                ours, theirs = result["checkouts"]["this"], result["checkouts"][label]
                result[f"this_vs_{label}"] = {
                    key: ours[key] / theirs[key] for key in ("end_to_end_images_per_s", "steady_images_per_s")}
                result[f"this_vs_{label}"]["one_photo_s"] = ours["one_photo_s"] / theirs["one_photo_s"]
    return result


def bench_light(args, work: Path, photo: Path, checkpoint: Path, log) -> dict:
    """One photo scored end to end with an ``.onnx`` export of the checkpoint under ``--light_python`` (the
    interpreter of a venv made from requirements-score.txt), median over ``--repeats``."""
    from scoring.onnx_export import export_onnx

    model = work / "tanet.onnx"
    export_onnx(checkpoint, model)
    python = sys.executable if args.light_python == "same" else args.light_python
    times = []
    for i in range(args.repeats):
        seconds, peak, _ = predict_run(REPO_DIR, photo, model, work / f"out_light_{i}.csv", "", python=python)
        times.append((seconds, peak))
        log(f"  one photo, .onnx with {python}: {seconds:.2f} s, peak {peak:.0f} MiB")
    return {"python": python, "one_photo_s": statistics.median(t for t, _ in times),
            "peak_memory_mb": max(p for _, p in times)}


def bench_engines(args, work: Path, photos: Path, checkpoint: Path, log) -> dict:
    """images/s and peak memory of this checkout's predict.py per --engines on the large run's photos and, with
    --library N, on N tiny JPEGs."""
    runs: dict = {}
    sets = {f"{args.images} photos": photos} if args.engines != ["local"] else {}
    if args.library:
        folder = work / f"library_{args.library}"
        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(min(100, args.library)):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"t{i:03d}.jpg")
        for i in range(100, args.library):
            os.link(folder / f"t{i % 100:03d}.jpg", folder / f"t{i:07d}.jpg")
        sets[f"{args.library} tiny images"] = folder
    for name, folder in sets.items():
        count = sum(1 for _ in folder.iterdir())
        for engine in args.engines:
            if folder == photos and engine == "local":
                continue  # timed as the large run
            seconds, peak, _ = predict_run(REPO_DIR, folder, checkpoint, work / f"out_{engine}.csv",
                                           f"{args.predict_args} --engine {engine}")
            runs[f"{name}, {engine}"] = {"images": count, "seconds": seconds, "images_per_s": count / seconds,
                                         "peak_memory_mb": peak}
            log(f"  {name}, --engine {engine}: {count / seconds:.1f} images/s, peak {peak:.0f} MiB")
    return runs


def predict_table(result: dict) -> str:
    """The end-to-end figures as a text table."""
    lines = [f"predict.py end to end, {result['photos'][-1]} photos of {result['image_size'][0]}x"
             f"{result['image_size'][1]} ({result['path'] or 'path not reported'})",
             f"{'checkout':<12} {'1 photo s':>10} {'e2e img/s':>10} {'steady img/s':>13} {'peak MiB':>9}"]
    for label, r in result["checkouts"].items():
        peak = max(r["peak_memory_mb"].values())
        lines.append(f"{label:<12} {r['one_photo_s']:>10.2f} {r['end_to_end_images_per_s']:>10.1f} "
                     f"{r['steady_images_per_s']:>13.1f} {peak:>9.0f}")
    if "light" in result:
        light = result["light"]
        lines.append(f"one photo, .onnx on {light['python']}: {light['one_photo_s']:.2f} s, "
                     f"peak {light['peak_memory_mb']:.0f} MiB")
    for name, r in result.get("engines", {}).items():
        lines.append(f"{name}: {r['images_per_s']:.1f} images/s end to end, peak {r['peak_memory_mb']:.0f} MiB")
    for key, ratios in result.items():
        if key.startswith("this_vs_"):
            lines.append(f"{key}: end to end {ratios['end_to_end_images_per_s']:.2f}x, steady state "
                         f"{ratios['steady_images_per_s']:.2f}x, one photo in {ratios['one_photo_s']:.2f} of the time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        for name in ("batch_size", "steps", "data_images"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        cuda = device.type == "cuda"
        train_names = list(args.paths or (CUDA_TRAIN if cuda else cpu_paths(train=True)))
        eval_names = list(args.eval_paths or (CUDA_EVAL if cuda else cpu_paths(train=False)))
        for names, train in ((train_names, True), (eval_names, False)):
            for name in names:
                parse_path(name, device, train=train)
    except ValueError as exc:
        print(f"benchmark.py: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.allocator_tuned = device.type == "cpu" and args.allocator == "tuned" and tune_cpu_allocator()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    if args.predict:
        if args.images <= args.images_small or args.images_small < 2:
            print("benchmark.py: error: --images must be larger than --images_small (at least 2)", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="tanet-bench-") as tmp:
            result = {"predict": bench_predict(args, Path(tmp), log), "machine": machine(device)}
        result["seconds"] = time.perf_counter() - started
        print(predict_table(result["predict"]))
        if args.json:
            atomic_save_json(result, args.json)
            log(f"wrote {args.json}")
        return 0
    report: dict = {"train": {}, "eval": {}, "data": {}, "machine": machine(device), "device": str(device),
                    "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                    "image_size": list(args.image_size), "details": {"train": {}, "eval": {}},
                    "allocator": "tuned" if args.allocator_tuned else "system", "reference": {}}
    log(f"benchmark on {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="tanet-bench-") as tmp:
        work = Path(tmp)
        if "train" not in args.skip:
            report["train"], report["details"]["train"] = run_paths(train_names, train=True, args=args, device=device,
                                                                    log=log)
        if "eval" not in args.skip:
            report["eval"], report["details"]["eval"] = run_paths(eval_names, train=False, args=args, device=device,
                                                                  log=log)
        for kind in ("train", "eval"):  # the path-named keys name options; the reference loop is apart
            if "reference" in report[kind]:
                report["reference"][kind] = report[kind].pop("reference")
        if args.largest_batch:
            for kind, speeds in (("train", report["train"]), ("eval", report["eval"])):
                batch_paths = [n for n in speeds if "isolated" not in n]
                if batch_paths:
                    best = max(batch_paths, key=speeds.get)
                    report[f"largest_batch_{kind}"] = largest_batch(best, train=kind == "train", args=args,
                                                                    device=device, log=log)
        if "data" not in args.skip:
            detail = bench_data(args, work, device, log)
            report["data"] = {"uncached": detail["train"]["uncached"], "cached": detail["train"]["cached"]}
            report["data_detail"] = detail
        if args.accuracy:
            fastest = [n for n in report["train"] if "compile" not in n and n != "fp32"]
            acc_train = args.accuracy_train_paths or ([max(fastest, key=report["train"].get)]
                                                      if fastest and not args.accuracy_checkpoint else [])
            try:
                report["accuracy"] = bench_accuracy(args, device, acc_train, eval_names, work, log)
            except GenerationError as exc:  # a --demo_root holding the user's files: left as it was
                print(f"benchmark.py: error: {exc}", file=sys.stderr)
                return 2
    report["seconds"] = time.perf_counter() - started
    print(table(report))
    if args.json:
        atomic_save_json(report, args.json)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
