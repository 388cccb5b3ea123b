"""The GPU checks behind README's "Scaling out" and "Speed" figures, as one call on a one-GPU machine.

    python tools/gpu_checks.py --out gpu_checks            # on the GPU machine
    python tools/gpu_checks.py --out /tmp/dry --quick --device cpu   # a fast dry run anywhere

Steps (``--skip`` leaves any out); everything goes to OUT/gpu_checks.log and OUT/summary.json:

ddp    Two processes sharing the one GPU (``--dist_backend gloo``) train the demo for one epoch,
       resume to a second, and one process re-evaluates the best checkpoint: its predictions must
       equal the two processes'. NCCL with two processes on one GPU must refuse with a clear message.
bench  ``tools/benchmark.py``: model paths at batch 40 and at the largest batch up to --big_batch,
       and the input pipeline with the cache's crop/flip/normalisation on the device.
cache  Training and test evaluation by ``main_nni.py`` from the prepared-dataset cache, on the demo's
       images listed --repeat times (throughput only: the copies carry no new information).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import report  # noqa: E402
from imagedata.demo_data import GenerationError, ensure_demo_dataset  # noqa: E402
from helpers.safe_io import atomic_save_json, json_text  # noqa: E402

RUN_FLAGS = ["--quiet", "--no_report", "--seed", "0"]


class Checks:
    def __init__(self, out: Path, log_path: Path) -> None:
        self.out, self.log_path, self.summary = out, log_path, {}

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def sh(self, *cmd: str, expect_fail: bool = False, timeout: int = 400) -> subprocess.CompletedProcess:
        """Run a command, log its output's tail, fail loudly unless it ended as expected."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        self.log("$ " + " ".join(cmd))
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a timeout ends torchrun's children too
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            timed_out = True
        self.log(f"  rc {proc.returncode} in {time.perf_counter() - started:.1f} s")
        self.log("  | " + "\n  | ".join((stdout + stderr).strip().splitlines()[-25:]))
        if timed_out:
            raise RuntimeError(f"{cmd[:4]} ran past {timeout} s")
        if (proc.returncode != 0) != expect_fail:
            raise RuntimeError(f"{cmd[:4]} ended with rc {proc.returncode}")
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    def save(self) -> None:
        atomic_save_json(self.summary, self.out / "summary.json")


def read_predictions(path: Path) -> dict[str, float]:
    table = report.read_predictions(path)
    return dict(zip(table.names, table.pred.tolist()))


def results(folder: Path) -> dict:
    r = json.loads((folder / "results.json").read_text())
    keep = ("srcc", "plcc", "accuracy", "mse", "n_images", "best_epoch", "test_images_per_s", "test_seconds")
    return {**{k: r.get(k) for k in keep},
            "epochs": [{k: e.get(k) for k in ("epoch", "train_images_per_s", "seconds", "val_srcc")}
                       for e in r.get("history", [])]}


def check_ddp(c: Checks, args, work: Path, demo: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "main_nni.py"]
    common = ["--dataset", "demo", "--demo_images", *map(str, args.demo_images), "--path_to_save_csv", str(demo),
              "--device", args.device,
              "--batch_size", "16", "--num_workers", "4", *RUN_FLAGS]
    two = work / "ddp_two"
    c.sh(*torchrun, *common, "--dist_backend", "gloo", "--num_epoch", "1", "--experiment_dir_name", str(two))
    c.sh(*torchrun, *common, "--dist_backend", "gloo", "--num_epoch", "2", "--resume",
         "--experiment_dir_name", str(two))
    one = work / "ddp_eval_one"
    tested = two / "best.pth" if (two / "best.pth").is_file() else two / "last.pth"  # as the training run chose
    c.sh(sys.executable, "main_nni.py", *common, "--test_only", "--path_to_model_weight", str(tested),
         "--experiment_dir_name", str(one))
    a, b = read_predictions(two / "test_predictions.csv"), read_predictions(one / "test_predictions.csv")
    same_images = sorted(a) == sorted(b)
    diff = max(abs(a[k] - b[k]) for k in a) if same_images else None
    log = (two / "train.log").read_text()
    refused = None
    if "nccl" not in args.skip:
        refused = c.sh(*torchrun, *common, "--dist_backend", "nccl", "--num_epoch", "1",
                       "--experiment_dir_name", str(work / "ddp_nccl"), expect_fail=True)
    c.summary["ddp"] = {
        "two_processes_gloo": results(two),
        "resumed": "resumed from" in log,
        "one_process_eval": results(one),
        "same_images": same_images,
        "max_abs_pred_diff": diff,
        "nccl_two_on_one_gpu": [line for line in (refused.stdout + refused.stderr).splitlines()
                                if "error:" in line][-1:] if refused else None,
    }
    c.save()


def check_bench(c: Checks, args, work: Path) -> None:
    json_path = c.out / "bench_gpu.json"
    paths = args.bench_paths
    if args.device == "cpu":
        paths = ["fp32", "bf16+channels_last"]
    eval_paths = paths + ["isolated+" + paths[-1]]
    options = ["--largest_batch", str(args.big_batch)] if args.big_batch else []
    options += ["--skip", "data"] if "data" in args.skip else []
    c.sh(sys.executable, "tools/benchmark.py", "--device", args.device, "--batch_size", str(args.bench_batch),
         "--steps", str(args.steps), "--paths", *paths, "--eval_paths", *eval_paths, *options,
         "--data_images", "40" if not args.quick else "8", "--data_seconds", "2" if not args.quick else "0.2",
         "--json", str(json_path), timeout=500)
    c.summary["bench"] = json.loads(json_path.read_text())
    c.save()


def repeat_split(demo: Path, split: str, images: Path, times: int) -> Path:
    """A CSV listing the demo split's images `times` times, under new names (hard links in `images`)."""
    rows = (demo / "merge" / f"{split}.csv").read_text(encoding="utf-8").splitlines()[1:]
    images.mkdir(exist_ok=True)
    lines = ["image,score"]
    for k in range(times):
        for row in rows:
            name, score = row.split(",")[:2]
            link = images / f"r{k}_{name}"
            if not link.exists():
                os.link(demo / "images" / name, link)
            lines.append(f"{link.name},{score}")
    target = images.parent / f"big_{split}.csv"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def check_cache(c: Checks, args, work: Path, demo: Path) -> None:
    images = work / "big_images"
    train, test = (repeat_split(demo, split, images, args.repeat) for split in ("train", "test"))
    data = ["--dataset", "csv", "--train_csv", str(train), "--test_csv", str(test), "--path_to_images", str(images),
            "--val_fraction", "0.02"]
    cache = work / "cache"
    started = time.perf_counter()
    c.sh(sys.executable, "tools/prepare_cache.py", *data, "--out", str(cache), "--quiet")
    build_seconds = time.perf_counter() - started
    amp = "fp16" if args.device.startswith("cuda") else "bf16"
    runs = {}
    for batch in args.cache_batches:
        run = work / f"cache_run_{batch}"
        c.sh(sys.executable, "main_nni.py", *data, "--cache_dir", str(cache), "--device", args.device,
             "--batch_size", str(batch), "--amp", amp, "--channels_last", "--num_epoch", "2",
             "--init_lr_res365_last", "0", "--backbones", "random", "--num_workers", str(args.workers),
             "--experiment_dir_name", str(run), *RUN_FLAGS, timeout=500)
        runs[str(batch)] = results(run)
    c.summary["cache"] = {"build_seconds": round(build_seconds, 1),
                          "path": f"{amp}+channels_last", "workers": args.workers, "runs": runs}
    c.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_checks.log, summary.json and bench_gpu.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip", nargs="+", choices=("ddp", "nccl", "bench", "data", "cache"), default=[],
                   help="steps to leave out (nccl: the NCCL refusal of the ddp step; "
                        "data: the benchmark's input pipeline)")
    p.add_argument("--steps", type=int, default=5, help="timed benchmark steps per path")
    p.add_argument("--bench_batch", type=int, default=40, help="benchmark's --batch_size")
    p.add_argument("--bench_paths", nargs="+", default=["fp32", "channels_last", "bf16+channels_last",
                                                          "fp16+channels_last"], help="benchmark's training paths")
    p.add_argument("--big_batch", type=int, default=256, help="benchmark's --largest_batch (0: none)")
    p.add_argument("--repeat", type=int, default=20, help="cache step: times the demo images are listed")
    p.add_argument("--cache_batches", type=int, nargs="+", default=[256, 40])
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--demo_images", type=int, nargs=2, default=(2200, 320))
    p.add_argument("--demo_root", default=None, help="demo data folder (default: data/demo; --quick: a temporary one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the script itself")
    args = p.parse_args(argv)
    if args.quick:
        args.demo_images, args.repeat, args.steps, args.big_batch = (48, 16), 2, 1, 80
        args.cache_batches, args.workers = [16], 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = Checks(out, out / "gpu_checks.log")
    c.summary["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    failed = []
    with tempfile.TemporaryDirectory(prefix="tanet-gpu-checks-") as tmp:
        root = args.demo_root or (Path(tmp) / "demo" if args.quick else None)
        try:
            demo = ensure_demo_dataset(root, n_train=args.demo_images[0], n_test=args.demo_images[1])
        except GenerationError as exc:  # a --demo_root that holds the user's files: left as it was
            print(f"gpu_checks.py: error: {exc}", file=sys.stderr)
            return 2
        for name, step in (("ddp", lambda: check_ddp(c, args, Path(tmp), demo)),
                           ("bench", lambda: check_bench(c, args, Path(tmp))),
                           ("cache", lambda: check_cache(c, args, Path(tmp), demo))):
            if name in args.skip:
                continue
            try:
                step()
            except Exception as exc:  # keep going: one broken step must not cost the others' figures
                c.log(f"step {name} failed: {exc}")
                failed.append(name)
    c.summary["failed"] = failed
    c.save()
    c.log(json_text({k: v for k, v in c.summary.items() if k != "bench"}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
