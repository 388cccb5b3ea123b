"""The generated personalized demo data set, in FLICKR-AES's file format.

demo_data.py's images (four themes, five controlled degradations, its ground-truth score on 1..10) are
rated 1..5 by synthetic workers, each image by ``RATERS_PER_IMAGE`` of them, and each worker has a taste
of its own that departs from the common score:

    rating = round(1 + 4 * (0.5 + 1.6 * ((1 - w) * q + w * appeal + noise - 0.5))), clipped to 1..5

where q is the image's demo score mapped onto 0..1, ``appeal`` in 0..1 is the worker's taste (one of
``TASTES``: one theme, strong colours, brightness, darkness, soft focus) and w its weight. A group of the
workers are the test workers, written to ``test_workers.txt``; as in FLICKR-AES each of their images has
one test worker among its raters. Layout:

    root/FLICKR-AES_image_labeled_by_each_worker.csv   worker, imagePair, score
    root/FLICKR-AES_image_score.txt                    image mean-score, one per line
    root/40K/*.jpg                                     the images
    root/test_workers.txt                              one test worker id per line
    root/worker_tastes.csv                             each worker's taste and weight (the demo's truth)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from imagedata.demo_data import (
    THEME_SOURCES,
    THEMES,
    ensure_generated,
    render_image,
    sample_photos,
    theme_score,
)
from imagedata.flickr_aes import IMAGE_FOLDER, MEAN_SCORES_TXT, RATINGS_CSV

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_DIR / "data" / "demo_personal"
TEST_WORKERS_FILE = "test_workers.txt"
TASTES_FILE = "worker_tastes.csv"
GENERATOR_VERSION = 1  # bump when the files a given seed produces change
RATERS_PER_IMAGE = 5
_NOISE = 0.07
_STRETCH = 1.6  # spreads the ratings over the scale (a mean of two terms in 0..1 bunches near the middle)
_COLOUR_THEMES = ("architecture", "flower")

# appeal(theme, exposure, saturation, blur, noise) in 0..1 of each taste
TASTES: dict[str, Callable[..., float]] = {
    **{f"loves {t}": (lambda t: lambda theme, **_: float(theme == t))(t) for t in THEMES},
    "strong colours": lambda theme, saturation, **_: saturation if theme in _COLOUR_THEMES else 0.0,
    "bright": lambda exposure, **_: exposure,
    "dark": lambda exposure, **_: 1.0 - exposure,
    "soft focus": lambda blur, **_: blur,
}


def rating(quality: float, appeal: float, weight: float, noise: float) -> int:
    """One worker's rating 1..5 of an image of demo score ``quality`` (0..1) and ``appeal`` (0..1) to it."""
    latent = 0.5 + _STRETCH * ((1.0 - weight) * quality + weight * appeal + noise - 0.5)
    return int(min(5, max(1, round(1.0 + 4.0 * latent))))


def _worker_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Amazon Mechanical Turk-like ids (as FLICKR-AES's workers have), distinct."""
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    ids: list[str] = []
    while len(ids) < n:
        candidate = "A" + "".join(rng.choice(letters, 13))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _generate(p: dict) -> Iterator[tuple[str, bytes]]:
    """The files of the data set, one (relative path, bytes) at a time: the images, then the lists."""
    rng = np.random.default_rng(p["seed"])
    workers = _worker_ids(rng, p["n_workers"])
    test_workers, training_workers = workers[:p["n_test_workers"]], workers[p["n_test_workers"]:]
    taste_names = list(TASTES)
    tastes = {w: taste_names[i % len(taste_names)] for i, w in enumerate(test_workers)}
    tastes.update({w: taste_names[int(rng.integers(len(taste_names)))] for w in training_workers})
    weights = {w: float(rng.uniform(0.3, 0.5)) for w in workers}

    # Who rates what: each test worker its own images (with training workers filling the other places),
    # and the generic images training workers alone.
    low, high = p["test_worker_images"]
    raters: list[list[str]] = []
    for worker in test_workers:
        for _ in range(int(rng.integers(low, high + 1))):
            raters.append([worker, *rng.choice(training_workers, RATERS_PER_IMAGE - 1, replace=False)])
    raters += [list(rng.choice(training_workers, RATERS_PER_IMAGE, replace=False)) for _ in range(p["n_generic"])]
    order = rng.permutation(len(raters))  # the two kinds of images interleaved in name order
    raters = [raters[i] for i in order]
    themes = [THEMES[i] for i in rng.permutation(np.arange(len(raters)) % len(THEMES))]

    photos = sample_photos()
    ratings: list[tuple[str, str, int]] = []
    means: list[tuple[str, float]] = []
    for i, (theme, who) in enumerate(zip(themes, raters)):
        params = {k: float(rng.random()) for k in ("exposure", "saturation", "blur", "noise", "jpeg")}
        source = THEME_SOURCES[theme][int(rng.integers(len(THEME_SOURCES[theme])))]
        data, score = render_image(photos[source], theme, params, np.random.default_rng(rng.integers(2 ** 63)),
                                   p["size"])
        name = f"farm{1 + i % 9}_{i:05d}_{rng.integers(16 ** 8):08x}_b.jpg"
        yield f"{IMAGE_FOLDER}/{name}", data
        quality = (theme_score(theme, **params) - 1.0) / 9.0
        given = []
        for worker in who:
            appeal = TASTES[tastes[worker]](theme=theme, **{k: params[k] for k in ("exposure", "saturation", "blur")})
            given.append(rating(quality, appeal, weights[worker], float(rng.normal(0.0, _NOISE))))
            ratings.append((str(worker), name, given[-1]))
        means.append((name, float(np.mean(given))))

    ratings.sort(key=lambda r: (r[0], r[1]))
    yield RATINGS_CSV, _utf8("worker, imagePair, score\n"
                             + "".join(f"{w}, {name}, {score}\n" for w, name, score in ratings))
    yield MEAN_SCORES_TXT, _utf8("".join(f"{name} {m:.1f}\n" for name, m in means))
    yield TEST_WORKERS_FILE, _utf8("".join(f"{w}\n" for w in test_workers))
    yield TASTES_FILE, _utf8("worker,test_worker,taste,weight\n" + "".join(
        f"{w},{int(w in test_workers)},{tastes[w]},{weights[w]:.3f}\n" for w in workers))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def personal_parameters(n_generic: int, n_workers: int, n_test_workers: int, test_worker_images: tuple[int, int],
                        seed: int, size: int) -> dict:
    """The generation parameters recorded in the manifest (a change regenerates the data); ValueError
    naming a bad one."""
    low, high = (int(v) for v in test_worker_images)
    for name, value, least in (("n_generic", n_generic, 1), ("n_test_workers", n_test_workers, 1),
                               ("n_workers", n_workers, n_test_workers + RATERS_PER_IMAGE),
                               ("size", size, 32), ("seed", seed, 0), ("test_worker_images", low, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"personalized demo data: {name} must be an integer >= {least}, got {value!r}")
    if high < low:
        raise ValueError(f"personalized demo data: test_worker_images needs LOW <= HIGH, got {low} {high}")
    return {"version": GENERATOR_VERSION, "n_generic": int(n_generic), "n_workers": int(n_workers),
            "n_test_workers": int(n_test_workers), "test_worker_images": [low, high], "seed": int(seed),
            "size": int(size), "tastes": list(TASTES), "noise": _NOISE, "stretch": _STRETCH}


def ensure_personal_dataset(root: str | os.PathLike | None = None, *, n_generic: int = 800, n_workers: int = 30,
                            n_test_workers: int = 6, test_worker_images: tuple[int, int] = (130, 170),
                            seed: int = 0, size: int = 256) -> Path:
    """Generate the personalized demo data under root (default data/demo_personal of the repo) unless a
    complete copy made with the same parameters is there; return root.

    ``n_generic`` images are rated by training workers alone; each of the ``n_test_workers`` test workers
    rates ``test_worker_images`` (LOW..HIGH) images of its own. Same parameters -> byte-identical files;
    the manifest is written last, so an interrupted generation is detected and redone.
    """
    params = personal_parameters(n_generic, n_workers, n_test_workers, test_worker_images, seed, size)
    return ensure_generated(Path(root) if root is not None else DEFAULT_ROOT, params, "personal_data.py",
                            f"the personalized demo data set ({n_workers} workers, {n_test_workers} of them test "
                            f"workers)", generate=lambda: _generate(params))
