"""Figures and an HTML report of what a trained TANet learned.

    python -m report runs/demo-20250101-120000                      # a finished run folder
    python -m report --checkpoint best.pth --dataset demo --out DIR  # a checkpoint on a test split

Writes report.html, report/*.png and TensorBoard images (logs/) into the run folder (or DIR).
Exit status: 0 on success, 1 when the report cannot be made, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imagedata.images import DataError
from option import DATASETS, VARIANT_NAMES, complete_options, positive_int
from report import ReportError, write_report, write_split_report
from helpers.safe_io import CheckpointError

PROG = "python -m report"
# Data options that may override (or, for a released checkpoint, supply) the run's saved options.
DATA_OPTIONS = ("dataset", "variant", "path_to_images", "path_to_save_csv", "test_csv", "eval_batch_size",
                "demo_images", "score_range")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Figures and an HTML report of a trained TANet: per-theme "
                                "metrics, scores, RGB attention, theme hidden nodes, best and worst images.")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR",
                   help="finished run folder (holds test_predictions.csv and best.pth / last.pth)")
    p.add_argument("--checkpoint", default=None,
                   help="TANet checkpoint (default: the run's best.pth, else last.pth); without RUN_DIR, the "
                        "checkpoint is scored on the test split of its saved options or of --dataset")
    p.add_argument("--out", default=None, help="output folder when there is no RUN_DIR")
    p.add_argument("--max_images", type=positive_int, default=None,
                   help="cap the model pass (theme hidden nodes; without RUN_DIR every figure) at the first N "
                        "test images (default: all)")
    p.add_argument("--attention_images", nargs="+", default=None, metavar="NAME",
                   help="images of the RGB-attention figure (default: 3 spread over the true score)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, the default), cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of the model pass (default: 0)")
    p.add_argument("--no_tensorboard", action="store_true", help="do not add the figures to TensorBoard (logs/)")
    p.add_argument("--allow_unsafe_load", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code: trusted files only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    d = p.add_argument_group("data (default: the options saved in the checkpoint)")
    d.add_argument("--dataset", choices=DATASETS, default=None)
    d.add_argument("--variant", choices=VARIANT_NAMES, default=None)
    d.add_argument("--path_to_images", default=None, help="folder of the dataset's images")
    d.add_argument("--path_to_save_csv", default=None, help="folder of the split CSVs")
    d.add_argument("--test_csv", default=None, help="--dataset csv: the test CSV")
    d.add_argument("--eval_batch_size", type=positive_int, default=None,
                   help="batch size of the model pass (theme fusion is over the batch)")
    d.add_argument("--demo_images", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"))
    d.add_argument("--score_range", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_dir is None and args.checkpoint is None:
        parser.error("give a run folder, or --checkpoint (with --out)")
    if args.run_dir is None and args.out is None:
        parser.error("--checkpoint without a run folder needs --out DIR")
    if args.run_dir is not None and args.out is not None:
        parser.error("--out is only for --checkpoint without a run folder: a run's report goes into the run folder")
    options = {k: getattr(args, k) for k in DATA_OPTIONS}
    common = dict(options=options, max_images=args.max_images, device=args.device, num_workers=args.num_workers,
                  tensorboard=not args.no_tensorboard, attention_images=args.attention_images,
                  allow_unsafe=args.allow_unsafe_load, progress=not args.quiet, complete_options=complete_options)
    try:
        if args.run_dir is not None:
            report = write_report(args.run_dir, checkpoint=args.checkpoint, **common)
        else:
            report = write_split_report(args.checkpoint, args.out, **common)
    except (ReportError, DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{report.html} ({len(report.figures)} figures in {report.data.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
