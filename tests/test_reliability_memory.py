"""Bounded memory: predict.py streams an image list, so its peak memory does not grow with the
number of images (1,000 vs 10,000).

Both runs are fresh processes (peak resident memory is per process) running predict.py's whole
path (list reading, loading, scoring, the table, the CSV) with a tiny stand-in for TANet: scoring
10,000 images with the real one on a 2-core CPU would take many minutes, and the model's memory
does not depend on the number of images anyway.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reliability_helpers import TinyTANet

REPO = Path(__file__).resolve().parent.parent
SIZES = (1_000, 10_000)
# Keeping what was loaded would cost at least the decoded 64x64 image per image (12 KiB; its
# 224x224 model input is 588 KiB): 9,000 more images, >= 108 MiB. The results themselves
# (a few hundred bytes per image) may grow.
MAX_GROWTH_MIB = 40

pytestmark = pytest.mark.slow  # whole predict.py runs in child processes



@pytest.fixture(scope="module")
def image_lists(tmp_path_factory):
    """{n: list file} of n images: one 64x64 JPEG hard-linked 10,000 times."""
    root = tmp_path_factory.mktemp("many")
    (root / "img").mkdir()
    one = root / "one.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(one)
    names = [f"img/{i:05d}.jpg" for i in range(max(SIZES))]
    link = os.link if hasattr(os, "link") else os.symlink
    for name in names:
        link(one, root / name)
    lists = {}
    for n in SIZES:
        lists[n] = root / f"list{n}.txt"
        lists[n].write_text("\n".join(names[:n]) + "\n")
    torch.save({"model": TinyTANet("tad66k").state_dict(), "variant": "tad66k"}, root / "tiny.pth")
    return lists


def test_peak_memory_of_scoring_does_not_grow_with_the_number_of_images(image_lists):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for n, listing in image_lists.items():  # both at once: one per core
        output = listing.with_suffix(".csv")
        runs[n] = output, subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "reliability_helpers.py"), str(listing),
             str(listing.parent / "tiny.pth"), str(output)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    growth = {}
    for n, (output, proc) in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["code"] == 0, err[-3000:]
        rows = list(csv.DictReader(output.open()))
        assert len(rows) == n and all(row["error"] == "" and 1 <= float(row["score"]) <= 10 for row in rows)
        growth[n] = (result["peak_kib_after"] - result["peak_kib_before"]) / 1024
    small, large = (growth[n] for n in SIZES)
    assert large - small < MAX_GROWTH_MIB, f"peak memory grew by {small:.0f} MiB for {SIZES[0]} images " \
                                           f"but {large:.0f} MiB for {SIZES[1]}"
