"""Build the prepared-dataset cache of a dataset's splits: every image decoded and resized once.

    python tools/prepare_cache.py --dataset tad66k --path_to_images /data/TAD66K/images --out cache/tad66k
    python tools/prepare_cache.py --dataset demo --out cache/demo

Takes main_nni.py's data options (same names, same meaning) and writes OUT/train, OUT/val and
OUT/test; train with ``main_nni.py ... --cache_dir OUT``.  Uses all cores; interrupt it at any time
and run the same command again to finish (done chunks are kept).  A cache that is already complete
and current is only checked.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/prepare_cache.py`
    sys.path.insert(0, str(REPO_DIR))

from cache import DEFAULT_CHUNK, build_cache  # noqa: E402
from dataset import DataError, build_datasets, check_images_exist, resolve_csv_dir  # noqa: E402

SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decode and resize a dataset's images once into a cache for training.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="cache folder (one subfolder per split)")
    p.add_argument("--dataset", choices=("tad66k", "ava", "csv", "demo"), default="demo")
    p.add_argument("--variant", choices=("tad66k", "ava"), default=None,
                   help="model variant (default: ava for --dataset ava, else tad66k)")
    p.add_argument("--path_to_images", default=None, help="folder of the dataset's images")
    p.add_argument("--path_to_save_csv", default=None, help="folder of the split CSVs (default: the dataset's)")
    p.add_argument("--train_csv", default=None)
    p.add_argument("--val_csv", default=None)
    p.add_argument("--test_csv", default=None)
    p.add_argument("--validation", choices=("split", "test"), default="split")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--split_seed", type=int, default=0, help="seed of the validation split (as main_nni.py's)")
    p.add_argument("--score_range", type=float, nargs=2, default=(1.0, 10.0), metavar=("LO", "HI"))
    p.add_argument("--skip_missing", action="store_true", help="leave out images missing from --path_to_images")
    p.add_argument("--skip_bad", action="store_true", help="record undecodable images as bad instead of stopping")
    p.add_argument("--demo_images", type=int, nargs=2, default=(480, 160), metavar=("TRAIN", "TEST"))
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="which splits to cache")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores; 0: this one)")
    p.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK, help="images per chunk (the unit of resuming)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers is not None and args.workers < 0:
        print(f"prepare_cache.py: error: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    variant = args.variant or ("ava" if args.dataset == "ava" else "tad66k")
    command = shlex.join(["python", "tools/prepare_cache.py", *argv])
    try:
        sets = build_datasets(
            args.dataset, variant=variant, image_dir=args.path_to_images,
            csv_dir=resolve_csv_dir(args.dataset, args.path_to_save_csv),
            validation=args.validation, val_fraction=args.val_fraction, seed=args.split_seed,
            score_range=tuple(args.score_range), skip_bad=args.skip_bad, train_csv=args.train_csv,
            val_csv=args.val_csv, test_csv=args.test_csv,
            demo_options={"n_train": args.demo_images[0], "n_test": args.demo_images[1], "seed": 0})
        for split in args.splits:
            ds = check_images_exist(sets[split], skip_missing=args.skip_missing)
            report = build_cache(ds, Path(args.out) / split, chunk_size=args.chunk_size, workers=args.workers,
                                 progress=not args.quiet, command=command)
            print(f"{split}: {report.n_images} images in {report.path} ({len(report.built)} of {report.n_chunks} "
                  f"chunks built now, {report.reused} already done, {len(report.bad)} bad; "
                  f"{report.seconds:.1f} s)")
    except (DataError, ValueError) as exc:
        print(f"prepare_cache.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_cache.py: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
