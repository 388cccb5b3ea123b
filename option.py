"""Command-line options of the trial script (argparse only).

Every option of the reference's ``option.py`` keeps its name; its learning rates,
declared ``int`` there, are floats here.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

DATASETS = ("tad66k", "ava", "csv", "demo", "flickr_aes")
VARIANT_NAMES = ("tad66k", "ava")
LR_OPTIONS = (
    "init_lr_res365_last",
    "init_lr_mobileNet",
    "init_lr_head",
    "init_lr_head_rgb",
    "init_lr_hypernet",
    "init_lr_tygertnet",
    "init_lr",
)
SELECTION_METRICS = ("srcc", "plcc", "accuracy")

# Defaults that depend on --dataset: the reference's for TAD66K and AVA, a CPU recipe for the demo.
REFERENCE_LR = 3e-4  # the reference option.py's default for every learning rate
_REFERENCE = {"backbones": "pretrained", "channels_last": False, "amp": "none", "fold_bn": False, "fuse_conv": False,
              "lr_schedule": "constant", "head_dropout": 0.75,
              **{k: REFERENCE_LR for k in LR_OPTIONS}}
DATASET_DEFAULTS: dict[str, dict[str, object]] = {
    "tad66k": {"batch_size": 40, "num_epoch": 200, **_REFERENCE},
    "csv": {"batch_size": 40, "num_epoch": 200, **_REFERENCE},
    "ava": {"batch_size": 48, "num_epoch": 20, **_REFERENCE},
    # FLICKR-AES's generic model: the authors withhold their recipe; TAD66K's (a single score, MSE).
    "flickr_aes": {"batch_size": 40, "num_epoch": 200, **_REFERENCE},
    # From scratch on 2 CPU cores: larger steps (rates of 2e-3), 5 epochs of 1,620 images (--demo_images), a
    # cosine schedule and light head dropout (the reference's 0.75 and rates of 1e-3 leave the run on the
    # steep part of its curve; docs/measurements_2026-12-07.md).
    "demo": {
        **_REFERENCE,
        "batch_size": 40,
        "num_epoch": 5,
        "lr_schedule": "cosine",
        "head_dropout": 0.1,
        "backbones": "random",
        "channels_last": True,
        "amp": "auto",
        "fold_bn": True,
        "fuse_conv": True,
        **{k: 2e-3 for k in LR_OPTIONS},
        "init_lr_res365_last": 0.0,
    },
}


CHECK_IMAGES = ("decode", "exists", "none")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options that say which images and CSVs a run uses (shared by every script that builds the
    splits: main_nni.py, tools/prepare_cache.py)."""
    p.add_argument("--dataset", choices=DATASETS, default="demo", help="which data to train and test on")
    p.add_argument("--variant", choices=VARIANT_NAMES, default=None,
                   help="model variant (default: ava for --dataset ava, else tad66k)")
    p.add_argument("--path_to_images", type=str, default=None, help="folder of the dataset's images")
    p.add_argument("--path_to_save_csv", type=str, default=None,
                   help="folder of the split CSVs: merge/{train,test}.csv as in data/TAD66K, or the reference's "
                        "train.csv and test.csv (default: the dataset's folder under data/)")
    p.add_argument("--validation", choices=("split", "test"), default="split",
                   help="split: select the best epoch on a validation split carved from train; "
                        "test: the reference protocol (select on the test split)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of train carved out for validation")
    p.add_argument("--split_seed", type=int, default=0,
                   help="seed of the validation split (kept apart from --seed so every run shares one split)")
    p.add_argument("--split_dir", type=str, default=None,
                   help="where the carved validation split is recorded as train_split.csv, val_split.csv and "
                        "split_info.json (default: the run folder's split/)")
    p.add_argument("--max_images", type=int, default=None,
                   help="use only the first N images of each split (smoke tests)")
    data = p.add_argument_group("data")
    data.add_argument("--train_csv", type=str, default=None, help="--dataset csv: training CSV (image,score[,theme])")
    data.add_argument("--val_csv", type=str, default=None, help="--dataset csv: validation CSV (default: carved)")
    data.add_argument("--test_csv", type=str, default=None, help="--dataset csv: test CSV")
    data.add_argument("--score_range", type=float, nargs=2, default=(1.0, 10.0), metavar=("LO", "HI"),
                      help="--dataset csv: range of the CSV scores, mapped onto 1..10")
    data.add_argument("--flickr_dir", type=str, default=None,
                      help="--dataset flickr_aes: the folder of FLICKR-AES_image_labeled_by_each_worker.csv (ratings "
                           "1..5, mapped onto 1..10 as --score_range 1 5); images in --path_to_images, else its 40K/")
    data.add_argument("--test_workers", type=str, default=None,
                      help="--dataset flickr_aes: the test workers (one id per line, or a CSV with a worker column); "
                           "no image they rated is trained on, and their images are the test split")
    data.add_argument("--check_images", choices=CHECK_IMAGES, default="decode",
                      help="before training, check that every image of every split decodes (on every core; "
                           "remembered per file, so a second run is instant), or only that it exists, or nothing")
    data.add_argument("--skip_missing", action="store_true",
                      help="drop images missing from --path_to_images (listed in missing_images_<split>.txt)")
    data.add_argument("--skip_bad", action="store_true",
                      help="drop (and list in bad_images_<split>.txt) images that cannot be decoded")
    data.add_argument("--follow_symlinks", action="store_true",
                      help="accept images that are symbolic links to files outside --path_to_images")
    data.add_argument("--demo_images", type=int, nargs=2, default=(1800, 640), metavar=("TRAIN", "TEST"),
                      help="--dataset demo: how many training and test images to generate")


def add_checkpoint_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, weight_option: bool = True) -> None:
    """The options that find a TANet checkpoint to score with (predict.py, serve.py, tools/export.py):
    ``--path_to_model_weight`` and ``--model`` (which set the same value; with ``weight_option=False``
    the script takes a positional checkpoint and ``--model`` sets ``model``), ``--variant``,
    ``--checkpoints_dir``, ``--download`` (or ``--pretrained``), ``--allow_unsafe_load``."""
    if weight_option:
        p.add_argument("--path_to_model_weight", default=None,
                       help="TANet checkpoint: a path (ours, a released one, or an ONNX export), or a released "
                            "file name looked up in --checkpoints_dir")
    p.add_argument("--model", dest="path_to_model_weight" if weight_option else "model", default=None, metavar="NAME",
                   help="a registered model (tanet-tad66k, tanet-ava, ...): its released weights, from "
                        "$TANET_CHECKPOINTS (else the torch hub folder's checkpoints/) or checkpoints/")
    p.add_argument("--variant", choices=VARIANT_NAMES, default=None,
                   help="model variant, only needed when the checkpoint does not tell (it must agree with it)")
    p.add_argument("--checkpoints_dir", default=None,
                   help="folder of weight files (default: $TANET_CHECKPOINTS or checkpoints/)")
    p.add_argument("--download", "--pretrained", action="store_true",
                   help="download a released checkpoint that is not there yet (--model: into $TANET_CHECKPOINTS, "
                        "else the torch hub folder's checkpoints/)")
    p.add_argument("--allow_unsafe_load", action="store_true",
                   help="allow weight files that need full unpickling (can run code: trusted files only)")


def add_speed_options(p: argparse.ArgumentParser) -> None:
    """The options of ``main_nni.py`` that make a run faster without changing what it computes."""
    speed = p.add_argument_group("speed")
    speed.add_argument("--cache_dir", type=str, default=None,
                       help="read the images from this prepared-dataset cache (built by tools/prepare_cache.py "
                            "with the same data options; see README, Speed)")
    speed.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=None,
                       help="autocast precision: auto (bf16 on a GPU or a CPU with bfloat16 instructions, else none), "
                            "none (float32), bf16, fp16 (CUDA only, with a gradient scaler); default: auto for the "
                            "demo, else none")
    speed.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels-last memory format (same numbers; default: on for the demo, off otherwise)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--allocator", choices=("tuned", "system"), default="tuned",
                       help="on the CPU, tuned: glibc keeps freed tensor memory for the next step instead of "
                            "unmapping it (same numbers, far less system time; default); system: as the reference ran")
    speed.add_argument("--fold_bn", action=argparse.BooleanOptionalAction, default=None,
                       help="evaluate a copy with each BatchNorm folded into its convolution (same numbers up to "
                            "rounding; default: on for the demo, off otherwise)")
    speed.add_argument("--fuse_conv", action=argparse.BooleanOptionalAction, default=None,
                       help="with --fold_bn, on the CPU: each convolution runs with its ReLU/ReLU6 and residual sum "
                            "fused in (oneDNN; same numbers up to rounding; default: on for the demo, off otherwise)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train or evaluate TANet (plain script or NNI trial).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ref = p.add_argument_group("reference options")
    ref.add_argument("--experiment_dir_name", type=str, default=None,
                     help="output folder of the run (default: runs/<dataset>-<time>; under NNI: the trial's folder)")
    ref.add_argument("--path_to_model_weight", type=str, default=None,
                     help="TANet checkpoint (ours or released; path or registry name) to start from or to evaluate")
    for name in LR_OPTIONS:
        ref.add_argument(f"--{name}", type=float, default=None, help="learning rate (default: per dataset)")
    ref.add_argument("--num_epoch", type=int, default=None, help="epochs (default: per dataset)")
    ref.add_argument("--batch_size", type=int, default=None, help="training batch size (default: per dataset)")
    ref.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: CPU cores, at most 8)")
    ref.add_argument("--gpu_id", type=str, default="0", help="CUDA device index used when --device is auto or cuda")

    run = p.add_argument_group("run")
    run.add_argument("--device", type=str, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=0, help="seed of every random number generator")
    run.add_argument("--branches", type=str, default=None,
                     help="the branches of the model, comma-separated, among aesthetics,theme,rgb (the paper's "
                          "ablation, Table 5; aesthetics always): default the full TANet, or the checkpoint's")
    run.add_argument("--theme_fusion", choices=("batch", "isolated"), default="batch",
                     help="batch: the reference (theme feature depends on batch-mates); isolated: every image alone")
    run.add_argument("--dist_backend", choices=("auto", "nccl", "gloo"), default="auto",
                     help="under torchrun: auto (NCCL on GPUs, gloo on the CPU); gloo lets processes share a GPU")
    run.add_argument("--test_only", action="store_true", help="evaluate --path_to_model_weight on the test split")
    run.add_argument("--resume", action="store_true", help="continue the run in --experiment_dir_name")
    run.add_argument("--resume_from", choices=("last", "best"), default="last",
                     help="with --resume: the checkpoint to continue from, last.pth (the last epoch) or best.pth "
                          "(the best epoch; its later epochs are run again)")
    run.add_argument("--metric", choices=SELECTION_METRICS, default="srcc",
                     help="validation metric that selects the best epoch and is NNI's 'default' "
                          "(the reference used accuracy)")
    run.add_argument("--loss", choices=("auto", "mse", "emd", "emd_reference"), default="auto",
                     help="training loss; auto: mse (tad66k) or emd_reference (ava, the reference's batch-level "
                          "EMD r=2); emd: NIMA's per-image EMD r=2")
    run.add_argument("--lr_schedule", choices=("constant", "cosine"), default=None,
                     help="constant: the reference; cosine: every learning rate falls from its initial value "
                          "towards 0 over the run, step by step (default: per dataset)")
    run.add_argument("--head_dropout", type=float, default=None,
                     help="dropout before the Linear of the fusion, aesthetics and RGB heads, in [0, 1) (the "
                          "reference: 0.75; default: per dataset)")
    run.add_argument("--eval_batch_size", type=int, default=None,
                     help="evaluation batch size (default: --batch_size, as the reference)")

    add_data_options(p)

    weights = p.add_argument_group("weights")
    weights.add_argument("--backbones", choices=("pretrained", "random"), default=None,
                         help="start from the Places365 ResNet-18 and ImageNet MobileNetV2 files, or from "
                              "random weights (default: pretrained, random for the demo)")
    weights.add_argument("--checkpoints_dir", type=str, default=None,
                         help="folder of weight files (default: $TANET_CHECKPOINTS or checkpoints/)")
    weights.add_argument("--download", action="store_true", help="download missing reference weight files")
    weights.add_argument("--allow_unsafe_load", action="store_true",
                         help="allow weight files that need full unpickling (can run code: trusted files only)")

    add_speed_options(p)

    out = p.add_argument_group("outputs")
    out.add_argument("--no_report", action="store_true", help="do not write the figures and HTML report at the end")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def apply_dataset_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with the defaults of ``args.dataset``."""
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.variant is None:
        args.variant = "ava" if args.dataset == "ava" else "tad66k"
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    return args


def complete_options(opts: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """``opts`` (parsed options, or those saved in a checkpoint, perhaps by an older version) with every
    missing option set to its default, the per-dataset ones included."""
    given = dict(vars(opts) if isinstance(opts, argparse.Namespace) else opts)
    if given.get("dataset") not in (None, *DATASETS):
        raise ValueError(f"unknown dataset {given['dataset']!r}; expected one of {', '.join(DATASETS)}")
    defaults = vars(build_parser().parse_args(["--dataset", str(given.get("dataset") or "demo")]))
    merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    return vars(apply_dataset_defaults(argparse.Namespace(**merged)))


def parse_trial_options(argv: Sequence[str]) -> argparse.Namespace:
    """``main_nni.py``'s options from ``argv``, the data set's defaults filled in and checked; ValueError
    (rather than argparse's exit) naming an option it does not take or a bad value."""
    parser = build_parser()

    def refuse(message: str) -> NoReturn:
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]
    return check_options(apply_dataset_defaults(parser.parse_args(list(argv))))


def require_flickr_files(args: argparse.Namespace, who: str, alternative: str = "") -> None:
    """ValueError naming ``--flickr_dir`` or ``--test_workers`` when ``args`` lacks it (``who`` needs them;
    ``alternative``, e.g. " (or --dataset demo)", ends the message)."""
    if not args.flickr_dir:
        raise ValueError(f"{who} needs --flickr_dir, the folder of FLICKR-AES_image_labeled_by_each_worker.csv"
                         f"{alternative}")
    if not args.test_workers:
        raise ValueError(f"{who} needs --test_workers FILE: the 37 test workers of the published split, one worker "
                         f"id per line or a CSV with a worker column{alternative}")


def check_options(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the option."""
    for name in ("batch_size", "eval_batch_size", "num_epoch"):
        value = getattr(args, name)
        if value < (0 if name == "num_epoch" else 1):
            raise ValueError(f"--{name} must be positive, got {value}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    for name in LR_OPTIONS:
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"--{name} must be a finite learning rate >= 0, got {value}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be positive, got {args.max_images}")
    if not 0 <= args.head_dropout < 1:
        raise ValueError(f"--head_dropout must be in [0, 1), got {args.head_dropout}")
    # The variant whose output (and target) is a vote distribution; the other gives one score.
    distribution = args.variant == "ava"
    lo, hi = args.score_range
    if not lo < hi:
        raise ValueError(f"--score_range needs LO < HI, got {lo} {hi}")
    if args.dataset == "flickr_aes":
        require_flickr_files(args, "--dataset flickr_aes")
        if distribution:
            raise ValueError("--dataset flickr_aes has one rating per worker and image, no vote distributions: use "
                             "--variant tad66k")
    if args.fuse_conv and not args.fold_bn:
        raise ValueError("--fuse_conv needs --fold_bn (a convolution meets its activation once BatchNorm is folded)")
    if args.test_only and not args.path_to_model_weight:
        raise ValueError("--test_only needs --path_to_model_weight")
    if args.dataset == "ava" and distribution and args.loss == "mse":
        raise ValueError("--loss mse needs --variant tad66k")
    if not distribution and args.loss in ("emd", "emd_reference"):
        raise ValueError(f"--loss {args.loss} needs --variant ava")
    return args


def merge_nni_parameters(args: argparse.Namespace, params: Mapping[str, object]) -> argparse.Namespace:
    """Override options with NNI's parameters; an unknown name or a value of the wrong type is an error."""
    known = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    for name, value in params.items():
        if name not in known:
            raise ValueError(f"NNI parameter {name!r} is not an option of main_nni.py")
        action = known[name]
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"NNI parameter {name!r}={value!r} is not one of {list(action.choices)}")
        kind = action.type
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            kind = bool
        if kind is int:
            if isinstance(value, bool) or not (isinstance(value, int)
                                               or (isinstance(value, float) and value.is_integer())):
                raise ValueError(f"NNI parameter {name!r} must be an integer, got {value!r} "
                                 f"(use 'choice' in the search space)")
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"NNI parameter {name!r} must be a number, got {value!r}")
            value = float(value)
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"NNI parameter {name!r} must be true or false, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise ValueError(f"NNI parameter {name!r} must be a string, got {value!r}")
        setattr(args, name, value)
    return args


def init(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the reference's entry point name); dataset defaults are applied later."""
    return build_parser().parse_args(argv)
