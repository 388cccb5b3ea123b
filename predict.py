"""Score your own images with a trained TANet (1..10 scale).

    python predict.py photos/ --path_to_model_weight SRCC_513_LCC_531_MSE_016.pth --output scores.csv

Exit status: 0 when every image was scored, 1 when some could not be, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

import option
from console import one_line, safe_text, warnings_as_lines
from option import non_negative_int, positive_int
from scoring import (
    NO_WEIGHTS_HELP,
    SORT_ORDERS,
    ScoreResult,
    Scorer,
    ScoringWarning,
    check_output_path,
    collect_images,
    rank_results,
    write_results,
)
from download import DownloadError
from runtime import ALLOCATORS, AMP_MODES, resolve_device, scoring_parallelism, tune_cpu_allocator

PROG = "predict.py"
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score images with a trained TANet on the 1..10 scale. PATH: an image, a folder of images, "
                    "a .txt list (one path per line) or a .csv list (an 'image' column).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, folders, .txt or .csv image lists")
    option.add_checkpoint_options(p.add_argument_group("weights"))
    i = p.add_argument_group("inputs")
    i.add_argument("--recursive", action="store_true", help="also score the images in subfolders of a folder")
    i.add_argument("--path_to_images", default=None,
                   help="folder that relative paths in .txt / .csv lists are relative to (default: the list's folder)")
    i.add_argument("--follow_symlinks", action="store_true",
                   help="score images in a folder that are symbolic links to files outside it")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="write the results to this .csv or .json file")
    o.add_argument("--sort", choices=SORT_ORDERS, default=None,
                   help="order by score (default: input order; best-first for --top, worst-first for --bottom)")
    only = o.add_mutually_exclusive_group()
    only.add_argument("--top", type=positive_int, default=None, metavar="N", help="report only the N best images")
    only.add_argument("--bottom", type=positive_int, default=None, metavar="N", help="report only the N worst images")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("run")
    r.add_argument("--theme_fusion", choices=("isolated", "batch"), default="isolated",
                   help="isolated (default): every image scored alone; "
                        "batch: the reference (scores depend on batch-mates)")
    r.add_argument("--batch_size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    r.add_argument("--num_workers", type=non_negative_int, default=None,
                   help="image-decoding processes (default: chosen from the CPU cores, see --threads)")
    r.add_argument("--device", default="auto", help="auto (CUDA when present; the default), cpu, cuda or cuda:N")
    r.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="precision: auto (the default: bf16 on a GPU or a CPU with bfloat16 instructions, else "
                        "float32), none (float32), bf16, fp16 (CUDA only)")
    r.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="score with BatchNorm folded into the convolutions and the convolutions fused with their "
                        "activations, channels-last (the default; scores equal up to float rounding)")
    r.add_argument("--draft", action="store_true",
                   help="decode JPEGs at a reduced size (2-4x faster decoding; the pixels, hence the scores, "
                        "change a little: see README)")
    r.add_argument("--allocator", choices=ALLOCATORS, default="tuned",
                   help="on the CPU, tuned (default): freed tensor memory is kept for the next batch instead of "
                        "unmapped (same scores, less system time); system: glibc's default")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of the model (default: with --num_workers, chosen from the CPU cores so that "
                        "decoding overlaps the model without oversubscribing them)")
    return p


def format_table(results: Sequence[ScoreResult], variant: str) -> str:
    """The results as an aligned text table: image, score (and std for ava), error."""
    header = ["image", "score", *(["std"] if variant == "ava" else []), "error"]
    lines = [header]
    for r in results:
        row = [safe_text(r.image), "" if r.score is None else f"{r.score:.3f}"]
        if variant == "ava":
            row.append("" if r.std is None else f"{r.std:.3f}")
        lines.append([*row, safe_text(r.error or "")])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header) - 1)]
    numeric = range(1, len(header) - 1)
    text = []
    for line in lines:
        cells = [line[c].rjust(widths[c]) if c in numeric else line[c].ljust(widths[c]) for c in range(len(widths))]
        text.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(text)


def _report_skipped(skipped: Sequence[tuple[str, str]], shown: int = 5) -> None:
    """One line per skipped file (the first few), then how many more."""
    for path, why in skipped[:shown]:
        print(f"{PROG}: skipped {safe_text(path)}: {why}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"{PROG}: skipped {len(skipped) - shown} more files that are not images", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings_as_lines(PROG, always=ScoringWarning):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.output is not None:
            check_output_path(args.output, inputs=[p for p in args.paths if not Path(p).is_dir()])
        if not args.path_to_model_weight:
            raise ValueError(NO_WEIGHTS_HELP)
        skipped: list[tuple[str, str]] = []
        images = collect_images(args.paths, recursive=args.recursive, path_to_images=args.path_to_images,
                                follow_symlinks=args.follow_symlinks, skipped=skipped)
        _report_skipped(skipped)
        if not images:
            raise ValueError(f"no images found in {' '.join(args.paths)}")
        if args.output is not None:
            check_output_path(args.output, inputs=[str(p) for p in images])
        workers, threads = scoring_parallelism(resolve_device(args.device))
        workers = workers if args.num_workers is None else args.num_workers
        torch.set_num_threads(threads if args.threads is None else args.threads)
        if args.allocator == "tuned" and resolve_device(args.device).type == "cpu":
            tune_cpu_allocator()
        scorer = Scorer(
            args.path_to_model_weight, variant=args.variant, device=args.device, theme_fusion=args.theme_fusion,
            batch_size=args.batch_size, amp=args.amp, fast=args.fast, draft=args.draft, num_workers=workers,
            allow_unsafe_load=args.allow_unsafe_load, checkpoints_dir=args.checkpoints_dir, download=args.download,
        )
    except (ValueError, FileNotFoundError, DownloadError) as exc:  # CheckpointError, DataError are ValueErrors
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{PROG}: {scorer.path}; {torch.get_num_threads()} model threads, {workers} decoding processes",
          file=sys.stderr)

    results = []
    for result in scorer.iter_results(images, progress=not args.quiet):
        if result.error is not None:
            tqdm.write(f"{PROG}: failed: {safe_text(result.error)}", file=sys.stderr)
        results.append(result)

    shown = rank_results(results, sort=args.sort, top=args.top, bottom=args.bottom)
    print(format_table(shown, scorer.variant))
    if args.output is not None:
        try:
            write_results(shown, args.output, scorer.variant)
        except OSError as exc:
            print(f"{PROG}: error: cannot write {safe_text(args.output)}: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
    failed = sum(r.error is not None for r in results)
    done = f"scored {len(results) - failed} of {len(results)} images"
    print(f"{PROG}: {done}" + (f"; {failed} failed" if failed else "")
          + (f"; results in {safe_text(args.output)}" if args.output else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
