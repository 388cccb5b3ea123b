"""What ``--draft`` (Pillow's reduced-size JPEG decoding) does to the scores of a checkpoint.

    python tools/draft_effect.py CKPT data/demo/images --csv data/demo/merge/test.csv
    python tools/draft_effect.py CKPT photos/ --json draft.json

Scores every image twice, with the default full decode and with ``--draft``, the same fast path
otherwise, and prints the largest and mean absolute change of a score (1..10), the SRCC between the
two, and with ``--csv`` (image,score) each one's SRCC against the true scores (only the CSV's images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/draft_effect.py`
    sys.path.insert(0, str(REPO_DIR))

from helpers.console import one_line  # noqa: E402
from helpers.safe_io import atomic_save_json  # noqa: E402
from dataset import read_score_csv  # noqa: E402
from imagedata.images import DataError  # noqa: E402
from scoring import Scorer, ScoringError, collect_images  # noqa: E402
from util import srcc  # noqa: E402


def draft_effect(checkpoint: str, inputs: list[str], csv: str | None = None, batch_size: int = 32) -> dict:
    """Scores with and without draft decoding compared: max/mean abs change, SRCC between them, vs truth."""
    images = collect_images(inputs)
    truth = None
    if csv is not None:
        table = read_score_csv(csv)
        wanted = {str(name): float(score) for name, score in zip(table["image"], table["score"])}
        images = [p for p in images if Path(p).name in wanted]
        truth = np.array([wanted[Path(p).name] for p in images])
    if len(images) < 2:
        raise ScoringError(f"{len(images)} image(s) to compare; give at least 2")
    scores = {}
    for draft in (False, True):
        results = Scorer(checkpoint, draft=draft, batch_size=batch_size).score_detailed(images)
        failed = [r for r in results if r.error]
        if failed:
            raise ScoringError(f"{failed[0].image}: {failed[0].error}")
        scores[draft] = np.array([r.score for r in results])
    change = np.abs(scores[True] - scores[False])
    out = {"images": len(images), "max_abs_change": float(change.max()), "mean_abs_change": float(change.mean()),
           "changed_images": int((change > 0).sum()), "srcc_draft_vs_default": srcc(scores[True], scores[False])}
    if truth is not None:
        out["srcc_default_vs_true"] = srcc(scores[False], truth)
        out["srcc_draft_vs_true"] = srcc(scores[True], truth)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The effect of --draft JPEG decoding on a checkpoint's scores.")
    p.add_argument("checkpoint", help="a checkpoint predict.py takes")
    p.add_argument("inputs", nargs="+", help="images, folders or lists, as predict.py takes them")
    p.add_argument("--csv", default=None, help="image,score CSV: compare with the true scores (its images only)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        out = draft_effect(args.checkpoint, args.inputs, args.csv, args.batch_size)
    except (ScoringError, DataError, FileNotFoundError) as exc:
        print(f"draft_effect.py: error: {one_line(exc)}", file=sys.stderr)
        return 1
    for key, value in out.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        atomic_save_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
