"""Train and evaluate TANet: an NNI trial (``nnictl create --config config.yml``) that also runs
as a plain script, on one process or several (``torchrun``)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter

import option
from helpers.console import SafeFormatter, one_line
from dataset import collate_skip_none
from imagedata.images import DataError
from training.run_data import build_run_datasets
from training.engine import (
    NonFiniteError,
    Predictions,
    default_loss,
    gather_predictions,
    is_better,
    make_criterion,
    make_loader,
    evaluation_model,
    fuses_conv,
    infer,
    train_one_epoch,
)
from models import (
    BRANCHES,
    check_branches,
    PARAM_GROUPS,
    TANet,
    get_pretrained_cfg,
    load_mobilenet_v2,
    load_places365_resnet18,
    load_tanet,
    lr_factor,
    parameter_groups,
    resolve_weights,
    scale_learning_rates,
)
from report import PREDICTIONS_CSV, ReportError, write_predictions, write_report
from helpers.download import DownloadError
from helpers.runlock import RunLock, RunLockedError
from helpers.runtime import (
    default_loader_workers,
    capture_rng_state,
    cpu_has_native_bf16,
    describe_hardware,
    precision_name,
    resolve_amp,
    resolve_device,
    restore_rng_state,
    seed_everything,
    tune_cpu_allocator,
)
from helpers.safe_io import (
    CheckpointError,
    DiskFullError,
    atomic_save_json,
    atomic_torch_save,
    remove_stale_temp_files,
    safe_torch_load,
)

try:
    import nni
except ImportError:  # NNI is optional for plain runs
    nni = None
if nni is not None and not hasattr(nni, "get_experiment_id"):  # a folder named nni/ on the path, not NNI
    nni = None

REPO = Path(__file__).resolve().parent
log = logging.getLogger("tanet")
CHECKPOINT_FORMAT = "tanet-run/1"


# --- setup ------------------------------------------------------------------------------------

def in_experiment() -> bool:
    return nni is not None and nni.get_experiment_id() != "STANDALONE"


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    args = option.init(argv)
    if in_experiment():
        args = option.merge_nni_parameters(args, nni.get_next_parameter() or {})
    return option.check_options(option.apply_dataset_defaults(args))


def place_process(device: str, gpu_id: str, backend: str, world: int, local_rank: int,
                  cuda_devices: int) -> tuple[str, str | None]:
    """(device name, process-group backend or None for one process) of this process.

    Under torchrun each process takes the GPU of its local rank; NCCL needs one GPU per process,
    gloo lets several processes share one (``--dist_backend gloo``).
    """
    if world == 1:
        return (f"cuda:{gpu_id}" if device in ("auto", "cuda") and cuda_devices > 0 else device), None
    cuda = device.startswith("cuda") or (device == "auto" and cuda_devices > 0)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("--dist_backend nccl needs CUDA devices; use gloo on the CPU")
    if not cuda or cuda_devices == 0:  # no CUDA here: resolve_device names the problem
        return device, backend
    if local_rank >= cuda_devices and backend == "nccl":
        raise ValueError(f"local rank {local_rank} has no GPU of its own ({cuda_devices} on this machine): NCCL "
                         f"needs one GPU per process; lower --nproc_per_node, "
                         f"or pass --dist_backend gloo to share GPUs")
    return f"cuda:{local_rank % cuda_devices}", backend


def distributed_setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name, backend = place_process(args.device, args.gpu_id, args.dist_backend, world,
                                  int(os.environ.get("LOCAL_RANK", "0")),
                                  torch.cuda.device_count() if torch.cuda.is_available() else 0)
    device = resolve_device(name)
    if backend is None:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return dist.get_rank(), world, device


def output_dir(args: argparse.Namespace) -> Path:
    if args.experiment_dir_name:
        return Path(args.experiment_dir_name)
    if in_experiment() and os.environ.get("NNI_OUTPUT_DIR"):
        return Path(os.environ["NNI_OUTPUT_DIR"])
    return REPO / "runs" / f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def setup_logging(out: Path | None) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    fmt = SafeFormatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if out is not None:
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8", errors="backslashreplace"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    for name in ("dataset", "imagedata.image_check", "imagedata.cache", "imagedata.demo_data"):
        logging.getLogger(name).handlers = handlers


def load_data(args: argparse.Namespace, out: Path, is_main: bool, world: int) -> dict:
    """The splits; rank 0 records the carved validation split, lists skipped images and checks the
    images first (the other ranks then find its results in the check cache)."""
    if world > 1 and not is_main:
        dist.barrier()
    splits = ("test",) if args.test_only else ("train", "val", "test")
    split_dir = (Path(args.split_dir) if args.split_dir else out / "split") if is_main else None
    sets = build_run_datasets(option.complete_options(args), splits=splits, split_dir=split_dir,
                              log_dir=out if is_main else None, progress=not args.quiet and is_main)
    if world > 1 and is_main:
        dist.barrier()
    if args.cache_dir:
        log.info("images: cache %s", args.cache_dir)
    return sets


def build_model(args: argparse.Namespace, device: torch.device, weights: Path | None) -> TANet:
    """TANet with the weights of ``weights`` (a TANet checkpoint), else the backbones of ``--backbones``."""
    unsafe = args.allow_unsafe_load
    if weights is not None:
        model, _ = load_tanet(weights, variant=args.variant, branches=args.branches, theme_fusion=args.theme_fusion,
                              allow_unsafe=unsafe, model_class=TANet, head_dropout=args.head_dropout)
        log.info("weights: %s", weights)
    else:
        model = TANet(args.variant, theme_fusion=args.theme_fusion, branches=args.branches or BRANCHES,
                      head_dropout=args.head_dropout)
        if args.backbones == "pretrained":
            kw = {"directory": args.checkpoints_dir, "download_missing": args.download}
            if model.has_theme_network:
                load_places365_resnet18(model, resolve_weights("resnet18_places365.pth.tar", **kw),
                                        allow_unsafe=unsafe)
            load_mobilenet_v2(model, resolve_weights("mobilenetv2.pth.tar", **kw), allow_unsafe=unsafe)
            log.info("backbones: Places365 ResNet-18 and ImageNet MobileNetV2")
        else:
            log.info("backbones: random initialisation")
    args.branches = list(model.branches)
    if args.branches != list(BRANCHES):
        log.info("branches: %s (the paper's ablation)", ", ".join(args.branches))
    model.freeze_theme_backbone()
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# --- outputs ----------------------------------------------------------------------------------

def save_predictions(preds: Predictions, variant: str, path: Path) -> None:
    """The test predictions as ``test_predictions.csv`` (scores on 1..10)."""
    pred, true = preds.scores_1_to_10(variant)
    write_predictions(path, preds.path, preds.theme, true, pred)


def evaluate(model, dataset, args, device, criterion, rank, world, desc) -> Predictions:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # Evaluate outside DDP: its forward is a collective, and the ranks may hold unequal numbers of
        # batches. Take rank 0's BatchNorm statistics first, as its checkpoint holds them.
        for buffer in model.module.buffers():
            dist.broadcast(buffer, 0)
        model = model.module
    model = evaluation_model(model, device, fold_bn=args.fold_bn, fuse_conv=args.fuse_conv, amp=args.amp,
                             channels_last=args.channels_last)
    loader = make_loader(
        dataset, batch_size=args.eval_batch_size, train=False, num_workers=args.num_workers, device=device,
        rank=rank, world_size=world, collate_fn=collate_skip_none,
    )
    part = infer(model, loader, device, criterion=criterion, amp=args.amp, channels_last=args.channels_last,
                   progress=not args.quiet and rank == 0, desc=desc)
    return gather_predictions(part, world)


def timed_evaluate(model, dataset, args, device, criterion, rank, world) -> tuple[Predictions, dict]:
    """The test split's predictions, and how long they took (seconds, images/s, all processes together)."""
    started = time.perf_counter()
    preds = evaluate(model, dataset, args, device, criterion, rank, world, "test")
    seconds = time.perf_counter() - started
    return preds, {"test_seconds": round(seconds, 3), "test_images_per_s": round(len(preds.path) / seconds, 1)}


def final_results(preds: Predictions, args, device: torch.device, split: str, checkpoint: str, extra: dict) -> dict:
    metrics = preds.metrics(args.variant)
    if not get_pretrained_cfg(args.variant).is_distribution:
        metrics.pop("emd", None)
    if "undefined" in metrics:  # a NaN SRCC/PLCC says why, in the log and in results.json
        log.warning("test SRCC and PLCC are undefined: %s", metrics["undefined"]["srcc"])
    return {**metrics, "split": split, "checkpoint": checkpoint, "dataset": args.dataset, "variant": args.variant,
            "theme_fusion": args.theme_fusion, "branches": args.branches, "eval_batch_size": args.eval_batch_size,
            "precision": precision_name(args.amp), "evaluation": evaluation_path(args, device),
            "hardware": describe_hardware(device), **extra}


def evaluation_path(args: argparse.Namespace, device: torch.device) -> dict:
    """How evaluation computed the test predictions (the report runs the same path)."""
    return {"device": str(device), "amp": args.amp, "fold_bn": bool(args.fold_bn),
            "channels_last": bool(args.channels_last),
            "fuse_conv": bool(args.fold_bn) and fuses_conv(args.fuse_conv, device, args.amp)}


def log_precision(args: argparse.Namespace, device: torch.device) -> None:
    """Say which precision runs (``--amp auto`` is already resolved) and warn where bf16 is emulated."""
    emulated = args.amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16()
    log.info("precision: %s%s", precision_name(args.amp),
             " (emulated on this CPU, which has no bfloat16 instructions: about 10x slower than float32; "
             "use --amp none)" if emulated else "")


def make_report(out: Path, args: argparse.Namespace, device: torch.device, checkpoint: str | None) -> None:
    """The figures and HTML report of the run (``--no_report`` skips it); a failure only warns."""
    if args.no_report:
        return
    try:
        report = write_report(out, device=str(device), num_workers=args.num_workers, progress=not args.quiet,
                              checkpoint=checkpoint, options=vars(args) if args.test_only else None,
                              complete_options=option.complete_options)
        log.info("report: %s", report.html)
    except (ReportError, DataError, CheckpointError) as exc:
        log.warning("report not written: %s", exc)


def summary(metrics: dict) -> str:
    keys = ("srcc", "plcc", "accuracy", "mse", "emd", "loss")
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


# --- checkpoints ------------------------------------------------------------------------------

def unwrap(model):
    return model.module if hasattr(model, "module") else model


SAVE_RETRY_WAITS = (10.0, 30.0, 60.0)  # seconds before each new try of a checkpoint on a full disk


def save_run_checkpoint(path: Path, model, optimizer, scaler, state: dict, args, rng: list) -> None:
    """Write a training checkpoint; on a full disk, try again after each of SAVE_RETRY_WAITS (the
    weights stay in memory), then raise DiskFullError."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "variant": args.variant,
        "branches": list(unwrap(model).branches),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
        "rng": rng,
        **state,
    }
    for wait in (*SAVE_RETRY_WAITS, None):
        try:
            atomic_torch_save(payload, path)
            return
        except DiskFullError as exc:
            if wait is None:
                raise DiskFullError(exc.errno, f"{exc} (tried {len(SAVE_RETRY_WAITS) + 1} times in "
                                               f"{sum(SAVE_RETRY_WAITS):.0f} s)") from None
            log.warning("%s; trying again in %.0f s", exc, wait)
            time.sleep(wait)


RECIPE_OPTIONS = ("batch_size", "seed", "loss", "lr_schedule", "head_dropout", "init_lr",
                  *(f"init_lr_{g}" for g in PARAM_GROUPS))


def changed_options(saved: dict, args: argparse.Namespace) -> str:
    """"--batch_size 6 (was 8), ..." for the options of the training recipe that differ from ``saved``
    (a checkpoint's options); "" when none does."""
    return ", ".join(f"--{k} {getattr(args, k)} (was {saved[k]})" for k in RECIPE_OPTIONS
                     if k in saved and saved[k] != getattr(args, k, saved[k]))


def read_resume_checkpoint(path: Path, out: Path) -> dict:
    """The training checkpoint to resume from; CheckpointError saying what to do when it is unusable."""
    other = "--resume_from best" if path.name == "last.pth" else "--resume_from last"
    hint = (f"resume from the other checkpoint with --resume {other}, or start again in a new folder with "
            f"--experiment_dir_name {free_folder(out, '-2')}")
    try:
        ckpt = safe_torch_load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project; {hint}")
    return ckpt


def all_rng_states(world: int) -> list:
    mine = capture_rng_state()
    if world == 1:
        return [mine]
    states: list = [None] * world
    dist.all_gather_object(states, mine)
    return states


# --- the run ----------------------------------------------------------------------------------

RUN_OUTPUTS = ("last.pth", "best.pth", "results.json", "test_predictions.csv")  # what makes a folder hold a run


def free_folder(out: Path, suffix: str) -> Path:
    """``out`` + ``suffix`` (+ a number) that does not exist yet."""
    candidate, n = Path(f"{out}{suffix}"), 2
    while candidate.exists():
        candidate, n = Path(f"{out}{suffix}{n}"), n + 1
    return candidate


def check_run_folder(args: argparse.Namespace, out: Path) -> None:
    """Refuse (RunLockedError) to write into a folder that holds a run's outputs, unless this run
    continues it with ``--resume`` from a checkpoint that is there."""
    held = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not held:
        return
    what = f"{out} already holds a run ({', '.join(held)})"
    if args.test_only:
        raise RunLockedError(f"{what}, which --test_only would overwrite; write the evaluation into another "
                             f"folder, e.g. --experiment_dir_name {free_folder(out, '-test')}")
    if not args.resume:
        raise RunLockedError(f"{what}: pass --resume to continue it, or choose another folder, e.g. "
                             f"--experiment_dir_name {free_folder(out, '-2')}")
    finished = [name for name in ("results.json", PREDICTIONS_CSV) if name in held]
    if finished and not (out / f"{args.resume_from}.pth").is_file():
        raise RunLockedError(f"{what} but no {args.resume_from}.pth to resume from (a finished evaluation, or a "
                             f"run of 0 epochs); choose another folder, e.g. --experiment_dir_name "
                             f"{free_folder(out, '-2')}")


@dataclass
class Trial:
    """What the steps of a run share: where it runs, its data, its model, and how training stands."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    status: dict  # status["phase"]: where the run is, for the message of an interrupted run
    data: dict = field(default_factory=dict)
    weights: Path | None = None  # --path_to_model_weight, resolved
    model: TANet | None = None
    net: Any = None  # what trains: the model, compiled and wrapped in DDP as asked
    criterion: Callable | None = None
    report_criterion: Callable | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    state: dict = field(default_factory=lambda: {"epoch": 0, "best_metric": None, "best_epoch": None, "history": []})

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device, out: Path,
        status: dict | None = None) -> dict:
    """Train (or, with ``--test_only``, evaluate) and write the run's outputs; ``status["phase"]`` says
    where it is (for the message of an interrupted run)."""
    trial = Trial(args, rank, world, device, out, {} if status is None else status)
    prepare_trial(trial)
    if args.test_only:
        return test_only(trial)
    prepare_training(trial)
    resume_training(trial)
    train_epochs(trial)
    return final_test(trial)


def prepare_trial(t: Trial) -> None:
    """Seed the process, load the data, build the model and choose the training and test losses."""
    args = t.args
    seed_everything(args.seed + t.rank)
    if args.num_workers is None:
        args.num_workers = default_loader_workers()
    t.status["phase"] = "loading the data"
    t.data = load_data(args, t.out, t.is_main, t.world)
    log.info("data: %s", ", ".join(f"{k} {len(v)}" for k, v in t.data.items()))
    if args.path_to_model_weight:
        t.weights = resolve_weights(args.path_to_model_weight, directory=args.checkpoints_dir,
                                    download_missing=args.download)
    t.model = build_model(args, t.device, t.weights)
    if args.fold_bn and args.fuse_conv and not fuses_conv(args.fuse_conv, t.device, args.amp):
        log.info("--fuse_conv: not used on %s in %s (a CPU path that needs oneDNN, and for bf16 AVX-512)",
                 t.device, args.amp)
    loss_name = default_loss(args.variant) if args.loss == "auto" else args.loss
    t.criterion = make_criterion(loss_name)
    t.report_criterion = make_criterion(default_loss(args.variant))


def test_only(t: Trial) -> dict:
    """``--test_only``: score the test split with the given weights and write the outputs."""
    args = t.args
    t.status["phase"] = "the test"
    preds, timing = timed_evaluate(t.model, t.data["test"], args, t.device, t.report_criterion, t.rank, t.world)
    results = final_results(preds, args, t.device, "test", str(t.weights), timing)
    if t.is_main:
        save_predictions(preds, args.variant, t.out / PREDICTIONS_CSV)
        atomic_save_json(results, t.out / "results.json")
        make_report(t.out, args, t.device, str(t.weights))
        if in_experiment():
            report_to_nni(results, args, final=True)
    log.info("test: %s (%d images)", summary(results), results["n_images"])
    return results


def prepare_training(t: Trial) -> None:
    """The network that trains (compiled, wrapped in DDP as asked), its optimiser and gradient scaler."""
    args, device = t.args, t.device
    net = t.model
    if args.compile:
        net = torch.compile(net)
    if t.world > 1:
        # softmax theme normalisation leaves the BatchNorm and PReLU of the theme matrix unused
        unused = get_pretrained_cfg(args.variant).theme_normalise == "softmax" or args.theme_fusion == "isolated"
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    t.net = net
    lrs = {name: getattr(args, f"init_lr_{name}") for name in PARAM_GROUPS}
    t.optimizer = torch.optim.Adam(parameter_groups(t.model, lrs), lr=args.init_lr)
    t.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None


def resume_training(t: Trial) -> None:
    """With ``--resume``, continue from the run folder's checkpoint (``--resume_from``) when it has one."""
    args, out = t.args, t.out
    start = out / f"{args.resume_from}.pth"
    if args.resume and start.is_file():
        ckpt = read_resume_checkpoint(start, out)
        t.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        if t.scaler is not None and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"][t.rank] if t.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        t.state = {k: ckpt[k] for k in t.state}
        log.info("resumed from %s after epoch %d", start, t.state["epoch"])
        changed = changed_options(ckpt.get("options") or {}, args)
        if changed:  # allowed (an NNI tuner may change them), but the run is no longer one recipe
            log.warning("--resume with options other than the checkpoint's run: %s; the epochs from now on train "
                        "with the new values", changed)
    elif args.resume:
        log.info("nothing to resume in %s: starting a new run", out)


def train_epochs(t: Trial) -> None:
    """The epochs from the one after ``t.state["epoch"]`` to ``--num_epoch``: each trained, validated,
    checkpointed, logged and reported."""
    args = t.args
    writer = SummaryWriter(str(t.out / "logs")) if t.is_main else None
    for epoch in range(t.state["epoch"], args.num_epoch):
        t.status["phase"] = f"epoch {epoch + 1} of {args.num_epoch}"
        train_loss, val, seconds, improved = train_epoch(t, epoch)
        rng = all_rng_states(t.world)
        if t.is_main:
            record_epoch(t, writer, rng, epoch, train_loss, val, seconds, improved)
    if writer is not None:
        writer.close()


def train_epoch(t: Trial, epoch: int) -> tuple[float, dict, float, bool]:
    """Train one epoch and validate it; (train loss, validation metrics, seconds, whether it is the best)."""
    args, optimizer = t.args, t.optimizer
    loader = make_loader(t.data["train"], batch_size=args.batch_size, train=True, num_workers=args.num_workers,
                         device=t.device, seed=args.seed, epoch=epoch, rank=t.rank, world_size=t.world,
                         collate_fn=collate_skip_none)
    started = time.time()
    total_steps, done_steps = args.num_epoch * len(loader), epoch * len(loader)
    train_loss = train_one_epoch(
        t.net, loader, optimizer, t.criterion, t.device, epoch=epoch, amp=args.amp, scaler=t.scaler,
        channels_last=args.channels_last, progress=not args.quiet and t.is_main,
        before_step=lambda i: scale_learning_rates(
            optimizer, lr_factor(args.lr_schedule, done_steps + i, total_steps)))
    train_seconds = time.time() - started
    val = evaluate(t.net, t.data["val"], args, t.device, t.criterion, t.rank, t.world, "val")
    val = val.metrics(args.variant, per_theme=False)
    seconds = time.time() - started
    value = val[args.metric]
    state = t.state
    improved = is_better(value, state["best_metric"])
    if improved:
        state["best_metric"], state["best_epoch"] = value, epoch + 1
    state["epoch"] = epoch + 1
    state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "seconds": seconds,
                             "train_images_per_s": round(len(t.data["train"]) / train_seconds, 1),
                             **{f"val_{k}": v for k, v in val.items() if k not in ("per_theme", "undefined")},
                             **({"val_undefined": val["undefined"]["srcc"]} if "undefined" in val else {})})
    return train_loss, val, seconds, improved


def record_epoch(t: Trial, writer: SummaryWriter, rng: list, epoch: int, train_loss: float, val: dict,
                 seconds: float, improved: bool) -> None:
    """Rank 0's records of a finished epoch: the checkpoints, the log line, TensorBoard and NNI."""
    args = t.args
    if improved:
        save_run_checkpoint(t.out / "best.pth", t.model, t.optimizer, t.scaler, t.state, args, rng)
    save_run_checkpoint(t.out / "last.pth", t.model, t.optimizer, t.scaler, t.state, args, rng)
    log.info("epoch %d/%d: train loss %.4f; val %s; %.0f s%s", epoch + 1, args.num_epoch, train_loss,
             summary(val), seconds, " (best)" if improved else "")
    writer.add_scalar("train/loss", train_loss, epoch + 1)
    for k in ("loss", "srcc", "plcc", "accuracy", "mse", "emd"):
        if k in val:
            writer.add_scalar(f"val/{k}", val[k], epoch + 1)
    for group in t.optimizer.param_groups:
        writer.add_scalar(f"lr/{group['name']}", group["lr"], epoch + 1)
    writer.flush()
    if in_experiment():
        report_to_nni(val, args, final=False)


def load_best_weights(t: Trial) -> str:
    """Load the best epoch's weights for the test; what they are (a checkpoint's path, or "initial weights")."""
    args, out = t.args, t.out
    last, best = out / "last.pth", out / "best.pth"
    if t.world > 1:
        dist.barrier()  # rank 0 has written the last epoch's best.pth before any rank reads it
    if best.is_file():
        t.model.load_state_dict(safe_torch_load(best)["model"])
        checkpoint = str(best)
    else:  # no epoch, or no finite validation metric: test the last weights
        checkpoint = str(last) if last.is_file() else "initial weights"
    if checkpoint == "initial weights" and t.weights is None:
        log.warning("--num_epoch %d: the test scores untrained weights (%s); pass --path_to_model_weight to test "
                    "a trained model", args.num_epoch, "backbones pretrained, heads random"
                    if args.backbones == "pretrained" else "random initialisation")
    return checkpoint


def final_test(t: Trial) -> dict:
    """Score the test split with the best weights and write the run's results, predictions and report."""
    args, state = t.args, t.state
    checkpoint = load_best_weights(t)
    t.status["phase"] = "the test"
    preds, timing = timed_evaluate(t.net, t.data["test"], args, t.device, t.report_criterion, t.rank, t.world)
    results = final_results(preds, args, t.device, "test", checkpoint, {**timing,
        "best_epoch": state["best_epoch"],
        "selection": f"{args.metric} on {'test' if args.validation == 'test' else 'val'}",
        "best_val_metric": state["best_metric"], "history": state["history"],
    })
    if t.is_main:
        save_predictions(preds, args.variant, t.out / PREDICTIONS_CSV)
        atomic_save_json(results, t.out / "results.json")
        log.info("test (best epoch %s): %s (%d images)", state["best_epoch"], summary(results), results["n_images"])
        make_report(t.out, args, t.device, None)
        if in_experiment():
            report_to_nni(results, args, final=True)
    return results


class UndefinedMetricError(ValueError):
    """The test metric an NNI trial reports is undefined (NaN): the trial fails rather than report a number."""


def report_to_nni(metrics: dict, args: argparse.Namespace, final: bool) -> None:
    """Report an epoch's validation metrics (intermediate) or the test's (final) to NNI, ``default`` being
    ``--metric``. NaN is never reported as a number: an undefined epoch is skipped, an undefined final
    result fails the trial (UndefinedMetricError), so it cannot pass for a real 0."""
    value = metrics[args.metric]
    if math.isnan(value):
        why = (metrics.get("undefined") or {}).get(args.metric, "not a number")
        if final:
            raise UndefinedMetricError(f"test {args.metric} is undefined ({why}): not reported to NNI, so the "
                                       f"trial is marked failed; the results are in results.json")
        log.warning("validation %s is undefined (%s): not reported to NNI for this epoch", args.metric, why)
        return
    keys = ("srcc", "plcc", "accuracy") + (() if final else ("loss",))
    payload = {"default": value, **{k: metrics[k] for k in keys if k in metrics and math.isfinite(metrics[k])}}
    (nni.report_final_result if final else nni.report_intermediate_result)(payload)


def lock_run_folder(out: Path, option_given: bool) -> RunLock:
    """Create (if needed) and lock the run folder; an error naming the option and the path if it cannot be."""
    lock = RunLock(out)
    name = "--experiment_dir_name " if option_given else ""
    try:
        return lock.acquire()
    except FileExistsError:
        raise RunLockedError(f"{name}{out}: a file of that name exists, not a folder; choose another folder") from None
    except OSError as exc:
        raise RunLockedError(f"{name}{out}: cannot create or write the run folder ({exc.strerror or exc}); "
                             f"choose a folder you can write to") from None


def resume_command(argv: list[str], out: Path) -> str:
    """The command line that continues this run: the same options, its folder, and --resume."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--experiment_dir_name":
            skip = True
        elif not (arg == "--resume" or arg.startswith("--experiment_dir_name=")):
            kept.append(arg)
    return shlex.join(["python", "main_nni.py", *kept, "--experiment_dir_name", str(out), "--resume"])


def interrupted(args: argparse.Namespace, argv: list[str], out: Path, status: dict, how: str = "interrupted") -> str:
    """The one line that says where a run stopped (on Ctrl-C: ``how`` "interrupted"), and how to continue it."""
    where = f"{how} during {status.get('phase', 'start-up')}"
    if args.test_only:
        return f"{where}; nothing was written: run the same command again"
    saved = [name for name in ("last.pth", "best.pth") if (out / name).is_file()]
    if not saved:
        return f"{where}, before the first epoch ended; nothing to resume: run the same command again"
    return f"{where}; continue from the last finished epoch with: {resume_command(argv, out)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, NNI stopping a trial): the run stops as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def catch_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise Terminated (from the main thread; elsewhere nothing changes); returns the undoing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_options(argv)
        args.branches = list(check_branches(args.branches)) if args.branches else None
        rank, world, device = distributed_setup(args)
        args.amp = resolve_amp(args.amp, device)
    except ValueError as exc:
        print(f"main_nni.py: error: {exc}", file=sys.stderr)
        return 2
    out = output_dir(args)
    status: dict = {}
    restore_sigterm = catch_sigterm()
    try:
        setup_logging(None)  # stderr only: the folder may be another run's until the lock is ours
        lock = lock_run_folder(out, bool(args.experiment_dir_name)) if rank == 0 else None
        try:
            check_run_folder(args, out)  # before anything is written there, train.log included
            setup_logging(out if rank == 0 else None)
            tuned = args.allocator == "tuned" and device.type == "cpu" and tune_cpu_allocator()
            log.info("device %s, %d process(es), output %s%s", device, world, out,
                     ", memory allocator tuned" if tuned else "")
            log_precision(args, device)
            for stale in remove_stale_temp_files(out) if rank == 0 else []:
                log.info("removed %s, a partial file left by an interrupted run", stale.name)
            run(args, rank, world, device, out, status)
        finally:
            if lock is not None:
                lock.release()
    except KeyboardInterrupt as exc:  # exit status 128 + the signal's number: 130 (SIGINT), 143 (SIGTERM)
        term = isinstance(exc, Terminated)
        log.error("%s", interrupted(args, argv, out, status, "interrupted (SIGTERM)" if term else "interrupted"))
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    except DiskFullError as exc:  # the last finished epoch's checkpoint is intact
        log.error("error: %s; %s", exc, interrupted(args, argv, out, status, "stopped"))
        return 1
    except (DataError, CheckpointError, RunLockedError, NonFiniteError, OSError, ValueError,
            DownloadError) as exc:  # UndefinedMetricError is a ValueError
        log.error("error: %s", one_line(exc))
        return 1
    finally:
        restore_sigterm()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
