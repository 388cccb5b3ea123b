"""Score your own images with a trained TANet (1..10 scale).

    python predict.py photos/ --path_to_model_weight SRCC_513_LCC_531_MSE_016.pth --output scores.csv

Exit status: 0 when every image was scored, 1 when some could not be, 2 for a usage error, 130 when
interrupted (Ctrl-C; --resume continues the run).
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import option
from helpers.console import one_line, safe_text, warnings_as_lines, write_line
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
)
from helpers.download import DownloadError
from models.registry import get_pretrained_cfg
from scoring.onnx_model import is_onnx_file
from scoring.result_log import ResultLog
from scoring.inputs import parse_shard
from scoring.results import ranks
from helpers.safe_io import sha256_file
from helpers.runtime import ALLOCATORS, AMP_MODES, resolve_device, scoring_parallelism, tune_cpu_allocator

PROG = "predict.py"
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
ENGINES = ("local", "ray")


def shard_option(text: str) -> tuple[int, int]:
    """--shard I/N as (I, N)."""
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    i.add_argument("--shard", type=shard_option, default=None, metavar="I/N",
                   help="score only part I of N (0 <= I < N): the images whose path relative to their folder (or "
                        "list) hashes to I; N runs, I = 0..N-1, split a collection without overlap or gaps")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None,
                   help="write the results to this .csv, .json, .jsonl or .parquet file (.parquet needs pyarrow); "
                        "rows are added as images are scored")
    o.add_argument("--resume", action="store_true",
                   help="continue the run that stopped while writing --output (killed, crashed, interrupted): "
                        "the images it scored are not scored again")
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
    r.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="precision: none (the default: float32, the same scores on every CPU), bf16 (faster on a GPU "
                        "or a CPU with bfloat16 instructions; scores move by up to about 0.06 on the 1..10 scale), "
                        "auto (bf16 where the device has it), fp16 (CUDA only)")
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
    s = p.add_argument_group("scale (pip install -r requirements-scale.txt)")
    s.add_argument("--engine", choices=ENGINES, default="local",
                   help="local (default): this process; ray: Ray Data, images decoded by Ray tasks and scored by a "
                        "pool of actors (one per GPU with --device cuda)")
    s.add_argument("--ray_address", default=None,
                   help="the Ray cluster of --engine ray (e.g. auto, or ray://HEAD:10001); default: a local Ray "
                        "started for this run")
    s.add_argument("--ray_actors", type=positive_int, default=None,
                   help="scoring actors of --engine ray (default: one per GPU with --device cuda, else one)")
    return p


def table_lines(results: Callable[[], Iterable[ScoreResult]], variant: str) -> Iterator[str]:
    """The results as an aligned text table, a line at a time: image, score (and std for ava), error.
    ``results`` is called twice (the column widths, then the lines), so a file's rows need not be in memory."""
    distribution = get_pretrained_cfg(variant).is_distribution
    header = ["image", "score", *(["std"] if distribution else []), "error"]

    def cells(r: ScoreResult) -> list[str]:
        row = [safe_text(r.image), "" if r.score is None else f"{r.score:.3f}"]
        if distribution:
            row.append("" if r.std is None else f"{r.std:.3f}")
        return [*row, safe_text(r.error or "")]

    widths = [len(h) for h in header[:-1]]
    for r in results():
        widths = [max(w, len(c)) for w, c in zip(widths, cells(r))]
    numeric = range(1, len(header) - 1)
    for line in itertools.chain([header], map(cells, results())):
        padded = [line[c].rjust(widths[c]) if c in numeric else line[c].ljust(widths[c]) for c in range(len(widths))]
        yield "  ".join([*padded, line[-1]]).rstrip()


def format_table(results: Sequence[ScoreResult], variant: str) -> str:
    """The results as an aligned text table: image, score (and std for ava), error."""
    return "\n".join(table_lines(lambda: results, variant))


def _report_skipped(skipped: Sequence[tuple[str, str]], shown: int = 5) -> None:
    """One line per skipped file (the first few), then how many more."""
    for path, why in skipped[:shown]:
        print(f"{PROG}: skipped {safe_text(path)}: {why}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"{PROG}: skipped {len(skipped) - shown} more files that are not images", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.resume_command = shlex.join(["python", PROG, *argv, *([] if args.resume else ["--resume"])])
    with warnings_as_lines(PROG, always=ScoringWarning):
        return _run(args)


def run_settings(args: argparse.Namespace, scorer: Scorer) -> dict:
    """What a resumed run must share with the run it continues, so that both give the same scores."""
    return {"weights": str(Path(scorer.checkpoint).resolve()) if scorer.checkpoint else None,
            "weights_sha256": sha256_file(scorer.checkpoint) if scorer.checkpoint else None,
            "theme_fusion": scorer.theme_fusion, "amp": scorer.amp, "fast": scorer.fast, "draft": bool(scorer.draft),
            "batch_size": scorer.batch_size if scorer.theme_fusion == "batch" else None,
            "shard": None if args.shard is None else "/".join(map(str, args.shard))}


def _open_run(args: argparse.Namespace) -> tuple[list, Scorer, ResultLog | None, str]:
    """The images to score, the Scorer, the result log of ``--output`` (None without it) and the line that
    says how the scoring runs in parallel; ValueError (or OSError) naming what is wrong."""
    log: ResultLog | None = None
    if args.resume and args.output is None:
        raise ValueError("--resume continues the run that writes --output: give --output")
    if args.output is not None:
        check_output_path(args.output, inputs=[p for p in args.paths if not Path(p).is_dir()])
        if not args.resume:
            ResultLog.refuse_unfinished(args.output, args.resume_command)
    if args.engine == "ray":
        from scoring import ray_engine as ray_scoring  # the optional extra: ray

        ray_scoring.check_available()
    if not args.path_to_model_weight:
        raise ValueError(NO_WEIGHTS_HELP)
    skipped: list[tuple[str, str]] = []
    images = collect_images(args.paths, recursive=args.recursive, path_to_images=args.path_to_images,
                            follow_symlinks=args.follow_symlinks, skipped=skipped, shard=args.shard)
    _report_skipped(skipped)
    if not images:
        raise ValueError(f"no images found in {' '.join(args.paths)}"
                         + (f" for --shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""))
    if args.output is not None:
        check_output_path(args.output, inputs=[str(p) for p in images])
    onnx = is_onnx_file(args.path_to_model_weight)  # onnxruntime on the CPU: torch is never imported
    device = "cpu" if onnx else resolve_device(args.device)
    workers, threads = scoring_parallelism(device)
    workers = workers if args.num_workers is None else args.num_workers
    threads = threads if args.threads is None else args.threads
    if not onnx:
        import torch

        torch.set_num_threads(threads)
        if args.allocator == "tuned" and device.type == "cpu":
            tune_cpu_allocator()
    scorer = Scorer(
        args.path_to_model_weight, variant=args.variant, device=args.device, theme_fusion=args.theme_fusion,
        batch_size=args.batch_size, amp=args.amp, fast=args.fast, draft=args.draft, num_workers=workers,
        allow_unsafe_load=args.allow_unsafe_load, checkpoints_dir=args.checkpoints_dir, download=args.download,
        threads=threads,
    )
    if args.output is not None:
        log = ResultLog(args.output, scorer.variant)
        log.open(settings=run_settings(args, scorer), images=[str(p) for p in images], resume=args.resume)
    return images, scorer, log, f"{threads} model threads, {workers} decoding {'threads' if onnx else 'processes'}"


def _run(args: argparse.Namespace) -> int:
    """Score the images of the parsed options (resuming ``--output`` with ``--resume``); the exit status."""
    try:
        images, scorer, log, parallel = _open_run(args)
    except (ValueError, FileNotFoundError, DownloadError) as exc:  # CheckpointError, DataError are ValueErrors
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"{PROG}: error: cannot write {safe_text(args.output)}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if log is not None and log.complete:
        print(f"{PROG}: {safe_text(args.output)} was complete already (its run had written it when it stopped)",
              file=sys.stderr)
        return EXIT_OK
    todo = images[log.done:] if log is not None else images
    if log is not None and log.done:
        print(f"{PROG}: resuming {safe_text(args.output)}: {log.done} of {len(images)} images scored already",
              file=sys.stderr)
    if args.engine == "ray":
        from scoring import ray_engine as ray_scoring

        source = ray_scoring.iter_results(scorer, todo, address=args.ray_address, actors=args.ray_actors,
                                          allow_unsafe_load=args.allow_unsafe_load, progress=not args.quiet)
        print(f"{PROG}: {scorer.path}; on Ray Data ({ray_scoring.describe()})", file=sys.stderr)
    else:
        source = scorer.iter_results(todo, progress=not args.quiet)
        print(f"{PROG}: {scorer.path}; {parallel}", file=sys.stderr)
    return _write_results(args, scorer, log, source, len(images))


def _write_results(args: argparse.Namespace, scorer: Scorer, log: ResultLog | None, source: Iterable[ScoreResult],
                   n_images: int) -> int:
    """Take the results from ``source`` as they come (into ``--output``'s log), print the table and the
    summary line; the exit status."""
    results: list[ScoreResult] = []  # without --output only: with it, the results are in the file
    try:
        for result in source:
            if result.error is not None:
                write_line(f"{PROG}: failed: {safe_text(result.error)}", file=sys.stderr)
            if log is not None:
                log.add(result)
            else:
                results.append(result)
        if log is not None:
            everything: Callable[[], Iterable[ScoreResult]] = log.results
            ranked = rank_results(list(log.results()), sort=args.sort, top=args.top, bottom=args.bottom) \
                if ranks(args.sort, args.top, args.bottom) else None
        else:
            everything = lambda: results  # noqa: E731
            ranked = rank_results(results, sort=args.sort, top=args.top, bottom=args.bottom)
        for line in table_lines(everything if ranked is None else lambda: ranked, scorer.variant):
            print(line)
        total = failed = 0
        for r in everything():
            total += 1
            failed += r.error is not None
        if log is not None:
            log.finish(ranked)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {safe_text(args.output)}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if log is None:
            raise
        log.close()
        print(f"{PROG}: interrupted; {log.done} of {n_images} images are in {safe_text(args.output)}; continue "
              f"with: {args.resume_command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if log is not None:
            log.close()
    done = f"scored {total - failed} of {total} images"
    print(f"{PROG}: {done}" + (f"; {failed} failed" if failed else "")
          + (f"; results in {safe_text(args.output)}" if args.output else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
