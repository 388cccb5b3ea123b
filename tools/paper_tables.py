"""Reproduce the paper's tables, one subcommand each.

    python tools/paper_tables.py personalized --flickr_dir DIR --test_workers FILE --generic CKPT --out DIR
    python tools/paper_tables.py personalized --dataset demo --shots 10 --repeats 2 --device cpu --out DIR
    python tools/paper_tables.py ablation --seeds 0 1 2 --out DIR  [main_nni.py data and recipe options]

``ablation`` is Table 5 (APNet, + TUNet, + RGBNet, TANet; ablation.py): every variant trained and tested by
main_nni.py with the options that follow, over the seeds. ``personalized`` is Table 4 (personalized aesthetics on
FLICKR-AES; the protocol is in personalize.py).
Without ``--generic`` the generic model is trained first with main_nni.py into OUT/generic. Interrupt it
at any time and run the same command again: it continues with the workers not yet done.
A subcommand is a pair ``add_<name>_parser(subparsers)`` / ``run_<name>(args)``; the protocols live in
the library modules, not here.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/paper_tables.py`
    sys.path.insert(0, str(REPO_DIR))

import option  # noqa: E402
from paper.ablation import AblationError, run_table  # noqa: E402
from helpers.console import one_line  # noqa: E402
from imagedata.images import DataError  # noqa: E402
from imagedata.flickr_aes import RatedImageDataset, WorkerSplit, image_folder, load_split  # noqa: E402
from imagedata.image_check import check_images  # noqa: E402
from models import get_pretrained_cfg, load_tanet, resolve_weights  # noqa: E402
from imagedata.personal_data import DEFAULT_ROOT, TEST_WORKERS_FILE, ensure_personal_dataset  # noqa: E402
from paper.personalize import (  # noqa: E402
    FINETUNE_PARTS,
    Heads,
    Protocol,
    ProtocolError,
    WORKERS_DIR,
    Recipe,
    ResultStore,
    extract_features,
    images_record,
    run_protocol,
    write_outputs,
)
from helpers.runlock import RunLock, RunLockedError  # noqa: E402
from helpers.runtime import default_loader_workers, resolve_device, run_tied_child, stopped_by_signal  # noqa: E402
from helpers.safe_io import CheckpointError, remove_stale_temp_files, sha256_file  # noqa: E402

log = logging.getLogger("paper_tables")
GENERIC_DIR = "generic"
# The demo's generic model: main_nni.py's demo recipe (random weights, CPU settings), in batches of 16:
# its 720 training images give 45 steps an epoch instead of 18.
DEMO_GENERIC_RECIPE = {**option.DATASET_DEFAULTS["demo"], "batch_size": 16}


# --------------------------------------------------------------------------- personalized (Table 4)

def add_personalized_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "personalized", help="Table 4: personalized aesthetics on FLICKR-AES (k = 10 and 100 images per worker)",
        description="Fine-tune the generic TANet on k images of each FLICKR-AES test worker and report the SRCC "
                    "on the worker's other images (Ren et al.'s protocol), before and after fine-tuning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: personalized.{json,md}, personalized_workers.csv, "
                                                "the per-worker records a rerun resumes from, generic/")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("flickr_aes", "demo"), default="flickr_aes",
                      help="FLICKR-AES, or the generated demo in its format (made on first use in --demo_dir)")
    data.add_argument("--flickr_dir", default=None, help="folder of FLICKR-AES_image_labeled_by_each_worker.csv")
    data.add_argument("--test_workers", default=None,
                      help="the test workers: one id per line, or a CSV with a worker column")
    data.add_argument("--path_to_images", default=None, help="folder of the images (default: FLICKR_DIR/40K)")
    data.add_argument("--demo_dir", default=str(DEFAULT_ROOT), help="--dataset demo: where the data is generated")
    data.add_argument("--check_images", choices=option.CHECK_IMAGES, default="decode",
                      help="check the test workers' images first (decode, exists, none)")
    model = p.add_argument_group("generic model")
    model.add_argument("--generic", default=None,
                       help="TANet checkpoint (tad66k variant) of the generic model; default: train one with "
                            "main_nni.py --dataset flickr_aes into OUT/generic (the demo's recipe for --dataset demo)")
    model.add_argument("--checkpoints_dir", default=None,
                       help="folder of weight files, where a released --generic is looked for (default: "
                            "$TANET_CHECKPOINTS or checkpoints/)")
    model.add_argument("--download", action="store_true", help="download a released --generic that is not there yet")
    model.add_argument("--generic_epochs", type=int, default=None,
                       help="epochs when training the generic model (default: main_nni.py's for the data set)")
    model.add_argument("--theme_fusion", choices=("batch", "isolated"), default="batch",
                       help="batch: the reference (theme feature from batches of --eval_batch_size images in name "
                            "order, computed once); isolated: every image alone")
    model.add_argument("--eval_batch_size", type=int, default=None,
                       help="batch of the frozen features (default: the checkpoint's, else 40)")
    protocol = p.add_argument_group("protocol")
    protocol.add_argument("--shots", type=int, nargs="+", default=[10, 100], help="k: images to fine-tune on")
    protocol.add_argument("--repeats", type=int, default=10, help="R: seeded draws of the k images")
    protocol.add_argument("--seed", type=int, default=0, help="seed of the draws and of fine-tuning")
    protocol.add_argument("--min_test_images", type=int, default=10,
                          help="a worker needs k + this many images to count for k")
    recipe = p.add_argument_group("fine-tuning")
    defaults = Recipe()
    recipe.add_argument("--finetune", choices=tuple(FINETUNE_PARTS), default=defaults.parts,
                        help="heads: the aesthetics head (Linear 1280->10) and the fusion head; fusion: the fusion "
                             "head alone; the rest stays frozen")
    recipe.add_argument("--ft_lr", type=float, default=defaults.lr, help="Adam learning rate")
    recipe.add_argument("--ft_epochs", type=int, default=defaults.epochs, help="passes over the k images")
    recipe.add_argument("--ft_batch_size", type=int, default=defaults.batch_size, help="0: all k images at once")
    recipe.add_argument("--ft_weight_decay", type=float, default=defaults.weight_decay, help="Adam weight decay")
    recipe.add_argument("--ft_dropout", action=argparse.BooleanOptionalAction, default=defaults.dropout,
                        help="the heads' dropout while fine-tuning")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (features and generic training)")
    run.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: CPU cores)")
    run.add_argument("--fold_bn", action=argparse.BooleanOptionalAction, default=True,
                     help="compute the frozen features with BatchNorm folded (same numbers up to rounding)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_personalized)
    return p


def _data_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(FLICKR-AES folder, test-workers file), generating the demo when asked."""
    if args.dataset == "demo":
        root = ensure_personal_dataset(args.demo_dir)
        return root, root / TEST_WORKERS_FILE
    option.require_flickr_files(args, "personalized", " (or --dataset demo)")
    return Path(args.flickr_dir), Path(args.test_workers)


def _recipe_options(recipe: dict) -> list[str]:
    """main_nni.py options that set ``recipe`` (an ``option.DATASET_DEFAULTS`` entry)."""
    argv: list[str] = []
    for key, value in recipe.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def generic_training_command(args: argparse.Namespace, flickr_dir: Path, test_workers: Path, out: Path) -> list[str]:
    """The main_nni.py command that trains (or continues training) the generic model in ``out``."""
    cmd = [sys.executable, str(REPO_DIR / "main_nni.py"), "--dataset", "flickr_aes", "--flickr_dir", str(flickr_dir),
           "--test_workers", str(test_workers), "--experiment_dir_name", str(out), "--resume", "--device",
           args.device, "--no_report"]
    if args.path_to_images:
        cmd += ["--path_to_images", args.path_to_images]
    if args.dataset == "demo":  # from random weights on a CPU, as main_nni.py --dataset demo trains
        cmd += _recipe_options(DEMO_GENERIC_RECIPE)
    if args.generic_epochs is not None:
        cmd += ["--num_epoch", str(args.generic_epochs)]
    if args.num_workers is not None:
        cmd += ["--num_workers", str(args.num_workers)]
    if args.quiet:
        cmd.append("--quiet")
    return cmd


def given_generic(args: argparse.Namespace) -> Path | None:
    """The file of ``--generic`` (a released one looked for in --checkpoints_dir, and downloaded with
    --download), or None without it."""
    if not args.generic:
        return None
    return resolve_weights(args.generic, directory=args.checkpoints_dir, download_missing=args.download,
                           progress=not args.quiet)


def generic_checkpoint(args: argparse.Namespace, flickr_dir: Path, test_workers: Path, out: Path) -> Path:
    """``--generic``, or the best checkpoint of the generic model trained in OUT/generic (trained, or its
    interrupted training continued, first)."""
    if args.generic:
        return given_generic(args)
    folder = out / GENERIC_DIR
    if not (folder / "results.json").is_file():
        cmd = generic_training_command(args, flickr_dir, test_workers, folder)
        log.info("training the generic model: %s", shlex.join(cmd))
        code = run_tied_child(cmd)
        if stopped_by_signal(code):
            raise RuntimeError(f"training the generic model was stopped (exit {code}); run the same command again "
                               f"to continue it")
        if code != 0:
            raise RuntimeError(f"training the generic model failed (exit {code}; main_nni.py's message above says "
                               f"why, its log is in {folder})")
    for name in ("best.pth", "last.pth"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds no best.pth or last.pth of the generic model")


def _settings(args: argparse.Namespace, protocol: Protocol, flickr_dir: Path, test_workers: Path,
              split: WorkerSplit) -> dict:
    from dataclasses import asdict

    generic = {"sha256": sha256_file(given_generic(args))} if args.generic else \
        {"trained_in": GENERIC_DIR, "epochs": args.generic_epochs}
    return {"protocol": {**asdict(protocol), "shots": list(protocol.shots)}, "dataset": args.dataset,
            "ratings_sha256": sha256_file(flickr_dir / "FLICKR-AES_image_labeled_by_each_worker.csv"),
            "test_workers_sha256": sha256_file(test_workers), "generic": generic,
            "theme_fusion": args.theme_fusion, "eval_batch_size": args.eval_batch_size,
            "images": images_record(image_folder(flickr_dir, args.path_to_images), split.test["image"].tolist())}


def run_personalized(args: argparse.Namespace) -> int:
    """Table 4: the generic model, the test workers' frozen features, every worker's draws, the outputs."""
    started = time.monotonic()
    recipe = Recipe(parts=args.finetune, lr=args.ft_lr, epochs=args.ft_epochs, batch_size=args.ft_batch_size,
                    weight_decay=args.ft_weight_decay, dropout=args.ft_dropout)
    protocol = Protocol(shots=tuple(args.shots), repeats=args.repeats, seed=args.seed,
                        min_test_images=args.min_test_images, recipe=recipe)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be positive, got {args.eval_batch_size}")
    device = resolve_device(args.device)
    flickr_dir, test_workers = _data_files(args)
    split = load_split(flickr_dir, test_workers)  # before any training: bad data stops here
    out = Path(args.out)
    with RunLock(out):
        for folder in (out, out / WORKERS_DIR):
            remove_stale_temp_files(folder)  # partial files of a killed run
        store = ResultStore(out, _settings(args, protocol, flickr_dir, test_workers, split)).open()
        checkpoint = generic_checkpoint(args, flickr_dir, test_workers, out)
        model, meta = load_tanet(checkpoint, theme_fusion=args.theme_fusion)
        model.to(device)
        if get_pretrained_cfg(model.variant).is_distribution:
            raise CheckpointError(f"{checkpoint} is an {model.variant!r} TANet; the protocol fine-tunes a tad66k one "
                                  f"(one score per image), as main_nni.py --dataset flickr_aes trains")
        batch = args.eval_batch_size or int((meta.get("options") or {}).get("eval_batch_size") or 40)
        images = RatedImageDataset(split.test, split.ratings_csv, image_folder(flickr_dir, args.path_to_images),
                                   train=False)
        check_images(images, mode=args.check_images, split="test", progress=not args.quiet, offer_skip=False)
        workers = default_loader_workers() if args.num_workers is None else args.num_workers
        features = store.features(lambda: extract_features(
            model, images, device=device, batch_size=batch, num_workers=workers, fold_bn=args.fold_bn,
            fuse_conv=args.fold_bn, progress=not args.quiet))
        records = run_protocol(split, features, Heads(model), protocol, store, progress=not args.quiet)
        about = {"data": "the generated demo data (FLICKR-AES format)" if args.dataset == "demo" else "FLICKR-AES",
                 "generic": f"{checkpoint} (sha256 {sha256_file(checkpoint)[:12]})", "eval_batch_size": batch,
                 "counts": {"test_workers": len(split.test_workers), "training_workers": len(split.training_workers),
                            "test_images": len(split.test), "generic_images": len(split.generic)}}
        write_outputs(out, records, protocol, about)
    print((out / "personalized.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'personalized.json'}, {out / 'personalized.md'}, {out / 'personalized_workers.csv'} "
          f"({time.monotonic() - started:.0f} s)")
    return 0


# --------------------------------------------------------------------------- ablation (Table 5)

def add_ablation_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ablation", help="Table 5: APNet, APNet + TUNet, APNet + RGBNet and TANet, trained and tested over seeds",
        description="Train and test every variant of Table 5 with main_nni.py; every option not listed here "
                    "(--dataset, --path_to_images, --num_epoch, ...) goes to each main_nni.py run unchanged. "
                    "Interrupt it at any time and run the same command again: it continues with the runs not done.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", required=True, help="output folder: table5.md, table5.json, runs.log, one folder per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds of each variant")
    p.set_defaults(run=run_ablation, passes_options=True)
    return p


def run_ablation(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        table = run_table(out, args.seeds, args.main_nni_options, read_options=option.parse_trial_options,
                          show_progress=sys.stderr.isatty())
    print((out / "table5.md").read_text(encoding="utf-8"), end="")
    print(f"table: {out / 'table5.md'} ({table['seconds_of_the_runs'] / 60:.1f} min of training and testing)")
    return 0


# --------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Reproduce the paper's tables.", allow_abbrev=False)
    subparsers = p.add_subparsers(dest="table", required=True, metavar="TABLE")
    add_ablation_parser(subparsers)
    add_personalized_parser(subparsers)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_options", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.main_nni_options = rest
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (DataError, ProtocolError, AblationError, CheckpointError, RunLockedError, FileNotFoundError, ValueError,
            RuntimeError) as exc:
        print(f"paper_tables.py {args.table}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"paper_tables.py {args.table}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
