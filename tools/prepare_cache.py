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

import option  # noqa: E402
from imagedata.cache import DEFAULT_CHUNK, build_cache  # noqa: E402
from helpers.console import one_line  # noqa: E402
from imagedata.images import DataError  # noqa: E402
from training.run_data import SPLITS, build_run_datasets  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decode and resize a dataset's images once into a cache for training.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="cache folder (one subfolder per split)")
    option.add_data_options(p)  # main_nni.py's data options: same names, same defaults
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
    command = shlex.join(["python", "tools/prepare_cache.py", *argv])
    out = Path(args.out)
    try:
        sets = build_run_datasets(option.complete_options(args), splits=args.splits,
                                  split_dir=Path(args.split_dir or out / "split"), log_dir=out, use_cache=False,
                                  progress=not args.quiet)
        for split, ds in sets.items():
            report = build_cache(ds, out / split, chunk_size=args.chunk_size, workers=args.workers,
                                 progress=not args.quiet, command=command)
            print(f"{split}: {report.n_images} images in {report.path} ({len(report.built)} of {report.n_chunks} "
                  f"chunks built now, {report.reused} already done, {len(report.bad)} bad; "
                  f"{report.seconds:.1f} s)")
    except (DataError, ValueError) as exc:
        print(f"prepare_cache.py: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_cache.py: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
