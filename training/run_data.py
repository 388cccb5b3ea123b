"""The data of a run, from its options: the splits built as ``main_nni.py`` builds them (the same
option names; the caller fills in the defaults), capped, checked, and read from the prepared cache when one is given.

``main_nni.py``, ``tools/prepare_cache.py`` and the report all build their splits here.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dataset import ImageTableDataset, build_datasets
from imagedata.flickr_aes import build_flickr_datasets
from imagedata.image_check import check_images
from models import get_pretrained_cfg

SPLITS = ("train", "val", "test")


def build_run_datasets(opts: Mapping[str, Any] | argparse.Namespace, *, splits: Iterable[str] = SPLITS,
                       split_dir: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                       validation: str | None = None, use_cache: bool = True,
                       progress: bool = False) -> dict[str, Any]:
    """The datasets of ``splits``: built from the options, each cut to ``--max_images`` and checked
    (``--check_images``, ``--skip_missing``, ``--skip_bad``; lists of skipped images into ``log_dir``),
    then read from ``--cache_dir`` when set and ``use_cache``. ``split_dir``: where the carved validation
    split is recorded (None: nowhere); ``validation`` overrides ``--validation``. ``opts`` holds every option
    (``option.complete_options`` completes those of a checkpoint or a partial mapping)."""
    o = dict(vars(opts) if isinstance(opts, argparse.Namespace) else opts)
    wanted = list(splits)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected some of {SPLITS}")
    demo_train, demo_test = o["demo_images"]
    if o["dataset"] == "flickr_aes":
        if get_pretrained_cfg(o["variant"]).is_distribution:
            raise ValueError("--dataset flickr_aes needs --variant tad66k (one score per image)")
        sets = build_flickr_datasets(
            o["flickr_dir"], o["test_workers"], image_dir=o["path_to_images"], validation=validation or o["validation"],
            val_fraction=o["val_fraction"], seed=o["split_seed"], split_dir=split_dir, skip_bad=o["skip_bad"],
            follow_symlinks=o["follow_symlinks"])
    else:
        sets = build_datasets(
            o["dataset"], distribution=get_pretrained_cfg(o["variant"]).is_distribution,
            image_dir=o["path_to_images"], csv_dir=o["path_to_save_csv"],
            validation=validation or o["validation"], val_fraction=o["val_fraction"], seed=o["split_seed"],
            score_range=tuple(o["score_range"]), skip_bad=o["skip_bad"], train_csv=o["train_csv"],
            val_csv=o["val_csv"], test_csv=o["test_csv"], split_dir=split_dir, follow_symlinks=o["follow_symlinks"],
            demo_options={"n_train": int(demo_train), "n_test": int(demo_test), "seed": 0},
        )
    out: dict[str, Any] = {}
    for split in wanted:
        ds: ImageTableDataset = sets[split]
        limit = o["max_images"]
        if limit is not None and len(ds) > int(limit):
            ds.keep([i < int(limit) for i in range(len(ds))])
        out[split] = check_images(ds, mode=o["check_images"], split=split, skip_missing=o["skip_missing"],
                                  skip_bad=o["skip_bad"], log_dir=log_dir, progress=progress)
    if use_cache and o["cache_dir"]:
        from imagedata.cache import CachedDataset  # images from tools/prepare_cache.py's cache; refused if stale

        out = {split: CachedDataset(ds, Path(o["cache_dir"]) / split) for split, ds in out.items()}
    return out
