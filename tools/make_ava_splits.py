"""Build a fallback AVA training CSV in the reference format from the public AVA.txt.

The reference's own training CSV is the authors' code/AVA/dataset/train.csv (put it into data/AVA/
when you have it). This keeps the reference's shipped test.csv and val.csv as they are and writes train.csv = every
AVA.txt image in neither of them (minus the ids
you exclude and, with --image_dir, images missing from your copy), sorted by image_id.

    python tools/make_ava_splits.py --ava_txt /path/to/AVA.txt [--image_dir /path/to/images]
        [--exclude corrupt_ids.txt] [--out_dir data/AVA]

AVA.txt columns (space separated): index, image_id, votes for scores 1..10, semantic tag 1,
semantic tag 2, challenge id.  Output columns: image_id, score2..score11 (votes for 1..10),
tag1, tag2, tag3 (= the challenge id, as in the shipped CSVs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/make_ava_splits.py`
    sys.path.insert(0, str(REPO_DIR))

import pandas as pd  # noqa: E402

from dataset import AVA_COLUMNS, AVA_TAG_COLUMNS, AVA_VOTE_COLUMNS, read_ava_csv  # noqa: E402
from imagedata.images import DataError  # noqa: E402
from helpers.safe_io import atomic_write  # noqa: E402

DEFAULT_AVA_DIR = REPO_DIR / "data" / "AVA"
_N_FIELDS = 15


def read_ava_txt(path: Path) -> pd.DataFrame:
    """AVA.txt -> DataFrame with the reference CSV columns (tag3 = challenge id); DataError on a bad line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"AVA.txt {path} not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"AVA.txt {path} is not a text file (bad byte at offset {exc.start})") from None
    rows: list[list[int]] = []
    ids: list[str] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _N_FIELDS:
            raise DataError(f"AVA.txt {path}: line {line_no} has {len(fields)} fields, expected {_N_FIELDS} "
                            f"(index, image_id, 10 vote counts, 2 tags, challenge id)")
        try:
            numbers = [int(x) for x in fields[2:]]
            image_id = str(int(fields[1]))
        except ValueError:
            raise DataError(f"AVA.txt {path}: line {line_no} has a non-integer field: {line.strip()!r}") from None
        if any(n < 0 for n in numbers[:10]):
            raise DataError(f"AVA.txt {path}: line {line_no} (image {image_id}) has a negative vote count")
        if image_id in seen:
            raise DataError(f"AVA.txt {path}: image {image_id} is listed twice (lines {seen[image_id]} and {line_no})")
        seen[image_id] = line_no
        ids.append(image_id)
        rows.append(numbers)
    if not rows:
        raise DataError(f"AVA.txt {path} has no data lines")
    df = pd.DataFrame(rows, columns=list(AVA_VOTE_COLUMNS + AVA_TAG_COLUMNS))
    df.insert(0, "image_id", ids)
    return df


def read_id_list(path: Path) -> set[str]:
    """Image ids, whitespace/comma separated, '#' starts a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"id list {path} cannot be read: {exc}") from None
    ids: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            token = token.removesuffix(".jpg")
            if not token.isdigit():
                raise DataError(f"id list {path}: line {line_no}: {token!r} is not an AVA image id")
            ids.add(str(int(token)))
    return ids


def build_train(ava: pd.DataFrame, held_out: set[str], exclude: set[str],
                image_dir: Path | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of AVA.txt for training, sorted by image_id, and the counts of what was left out."""
    ids = ava["image_id"]
    in_held = ids.isin(held_out)
    excluded = ~in_held & ids.isin(exclude)
    no_votes = ~in_held & ~excluded & (ava[list(AVA_VOTE_COLUMNS)].sum(axis=1) == 0)
    keep = ~in_held & ~excluded & ~no_votes
    missing = pd.Series(False, index=ava.index)
    if image_dir is not None:
        missing = keep & ~ids.map(lambda i: (image_dir / f"{i}.jpg").is_file())
        keep &= ~missing
    train = ava[keep]
    train = train.iloc[train["image_id"].astype("int64").argsort(kind="stable")]  # ids are integers here
    counts = {"in_test_or_val": int(in_held.sum()), "excluded": int(excluded.sum()),
              "no_votes": int(no_votes.sum()), "missing_image": int(missing.sum()), "train": len(train)}
    return train.reset_index(drop=True), counts


def write_train_csv(train: pd.DataFrame, path: Path) -> None:
    """Write train.csv atomically, after checking the written file with dataset.read_ava_csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        train[list(AVA_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
        read_ava_csv(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_atomic(src: Path, dest: Path) -> None:
    with atomic_write(dest, "wb") as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def compare_val_test(val_path: Path, test_path: Path, val: pd.DataFrame, test: pd.DataFrame) -> str:
    """One line saying whether the two shipped CSVs are the same file, the same images, or overlap."""
    if val_path.read_bytes() == test_path.read_bytes():
        return f"{val_path.name} and {test_path.name} are identical files ({len(test)} images)"
    common = len(set(val["image_id"]) & set(test["image_id"]))
    return (f"{val_path.name} ({len(val)} images) and {test_path.name} ({len(test)} images) differ; "
            f"{common} image(s) in both")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ava_txt", required=True, type=Path, help="the public AVA.txt")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_AVA_DIR,
                        help="where train.csv (and copies of test/val.csv if elsewhere) go (default: data/AVA)")
    parser.add_argument("--test_csv", type=Path, default=DEFAULT_AVA_DIR / "test.csv",
                        help="the reference's test CSV, kept as is (default: data/AVA/test.csv)")
    parser.add_argument("--val_csv", type=Path, default=DEFAULT_AVA_DIR / "val.csv",
                        help="the reference's validation CSV, kept as is (default: data/AVA/val.csv)")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="file of image ids to leave out of train.csv (e.g. known-corrupt images); repeatable")
    parser.add_argument("--image_dir", type=Path, default=None,
                        help="leave out images whose <image_id>.jpg is not in this folder")
    args = parser.parse_args(argv)
    try:
        test, val = read_ava_csv(args.test_csv), read_ava_csv(args.val_csv)
        print(compare_val_test(args.val_csv, args.test_csv, val, test))
        ava = read_ava_txt(args.ava_txt)
        exclude: set[str] = set()
        for path in args.exclude:
            exclude |= read_id_list(path)
        if args.image_dir is not None and not args.image_dir.is_dir():
            raise DataError(f"--image_dir {args.image_dir} is not a folder")
        held_out = set(test["image_id"]) | set(val["image_id"])
        unknown = len(held_out - set(ava["image_id"]))
        if unknown:
            print(f"warning: {unknown} test/val image(s) are not in {args.ava_txt}", file=sys.stderr)
        train, counts = build_train(ava, held_out, exclude, args.image_dir)
        if counts["train"] == 0:
            raise DataError("no training images left after removing test/val, excluded and missing images")
        out_dir = args.out_dir
        write_train_csv(train, out_dir / "train.csv")
        for src, name in ((args.test_csv, "test.csv"), (args.val_csv, "val.csv")):
            dest = out_dir / name
            if not (dest.exists() and dest.resolve() == src.resolve()):
                _copy_atomic(src, dest)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'train.csv'}: {counts['train']} images "
          f"(left out: {counts['in_test_or_val']} in test/val, {counts['excluded']} excluded, "
          f"{counts['no_votes']} without votes, {counts['missing_image']} missing from --image_dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
