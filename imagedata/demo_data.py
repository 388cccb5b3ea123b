"""Synthetic, learnable demo data set in the TAD66K layout, made from scikit-learn's two sample photos.

Each image is a random crop of china.jpg (a temple) or flower.jpg, given one of four themes and
five controlled degradations, each drawn uniformly from [0, 1]:

    exposure  e: gamma 2 ** (1.3 - 2.6 e)   (0 = dark, 1 = bright)
    saturation s: colour gain 0.3 + 1.5 s     (colour themes only)
    blur      b: Gaussian blur, sigma 3.5 b pixels (at 256 px)
    noise     n: Gaussian noise, std 0.14 n of the full range
    jpeg      j: saved with JPEG quality 35 + 60 j

Themes (recognisable from content or a strong global look) and what makes a good picture:

    architecture  colour temple crops       bright and sharp are good
    flower        colour flower crops       dark (low-key) and vivid are good
    mono          black-and-white, either   film grain (noise) and sharpness are good
    vintage       sepia-toned, either       soft focus (blur) and clean, mid exposure are good

The theme's weighted sum q of these terms (weights in `SCORE_RULES`, plus 0.1 for JPEG quality)
is stretched around 0.5 and mapped to a score 1 + 9 q on the 1..10 scale, so the same exposure,
noise or blur is good in one theme and bad in another: the right score needs the theme.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from helpers.safe_io import atomic_save_json, atomic_write, json_text, sha256_file

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DEMO_ROOT = REPO_DIR / "data" / "demo"
GENERATOR_VERSION = 1  # bump when the images or scores a given seed produces change

THEMES = ("architecture", "flower", "mono", "vintage")
# Which sample photo each theme crops: china.jpg is the temple, flower.jpg the flower.
THEME_SOURCES = {"architecture": ("china",), "flower": ("flower",),
                  "mono": ("china", "flower"), "vintage": ("china", "flower")}
# Per theme: weight of each "goodness" term; each term is in [0, 1] and each row sums to 0.9.
# Keys: bright = e, dark = 1 - e, mid = 1 - 2|e - 0.5|, vivid = s, sharp = 1 - b, soft = b,
# grainy = n, clean = 1 - n.  JPEG quality adds 0.1 j in every theme.
SCORE_RULES: dict[str, dict[str, float]] = {
    "architecture": {"bright": 0.5, "sharp": 0.3, "clean": 0.1},
    "flower": {"dark": 0.45, "vivid": 0.35, "clean": 0.1},
    "mono": {"grainy": 0.45, "sharp": 0.35, "mid": 0.1},
    "vintage": {"soft": 0.5, "clean": 0.25, "mid": 0.15},
}
_JPEG_WEIGHT = 0.1
_STRETCH = 1.5  # widens the score spread; about 5% of the images are clipped to 1 or 10
_SEPIA = np.array([1.0, 0.78, 0.52], dtype=np.float32)
_MANIFEST = "manifest.json"
_JOURNAL = ".manifest.journal"  # the files of a generation in progress, one JSON line each
_OLD_LOCK = ".generate.lock"  # the lock file of earlier versions: left alone
_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # safe_io.atomic_write's temp files


def theme_score(theme: str, exposure: float, saturation: float, blur: float, noise: float,
                jpeg: float) -> float:
    """The demo's ground-truth score on 1..10 for one image's theme and degradation levels."""
    terms = {"bright": exposure, "dark": 1.0 - exposure, "mid": 1.0 - 2.0 * abs(exposure - 0.5),
             "vivid": saturation, "sharp": 1.0 - blur, "soft": blur, "grainy": noise, "clean": 1.0 - noise}
    q = sum(w * terms[k] for k, w in SCORE_RULES[theme].items()) + _JPEG_WEIGHT * jpeg
    q = min(1.0, max(0.0, 0.5 + _STRETCH * (q - 0.5)))
    return 1.0 + 9.0 * q


def sample_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images  # deferred: importing sklearn takes a second

    data = load_sample_images()
    return {Path(f).stem: img for f, img in zip(data.filenames, data.images)}


def render_image(src: np.ndarray, theme: str, params: dict[str, float], rng: np.random.Generator,
                 size: int) -> tuple[bytes, float]:
    """One degraded crop as JPEG bytes, and its score."""
    h, w = src.shape[:2]
    side = int(rng.integers(min(h, w) * 3 // 5, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(src[top:top + side, left:left + side])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0

    lum = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if theme in ("mono", "vintage"):
        x = lum[..., None]  # one channel until the final toning
    else:
        x = lum[..., None] + (0.3 + 1.5 * params["saturation"]) * (x - lum[..., None])
    x = np.clip(x, 0.0, 1.0) ** (2.0 ** (1.3 - 2.6 * params["exposure"]))

    sigma = 3.5 * params["blur"]
    if sigma > 0.05:
        u8 = np.rint(x * 255.0).astype(np.uint8)
        img = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32).reshape(x.shape) / 255.0
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * (0.14 * params["noise"])
    if theme == "vintage":
        x = x * _SEPIA
    elif theme == "mono":
        x = np.repeat(x, 3, axis=2)
    out = Image.fromarray(np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(round(35 + 60 * params["jpeg"])))
    return buf.getvalue(), theme_score(theme, **params)


def _generate(n_train: int, n_test: int, seed: int, size: int) -> Iterator[tuple[str, bytes]]:
    """The files of the data set, one (relative path, bytes) at a time: the images, then the CSVs."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    themes: list[str] = []
    for n in (n_train, n_test):  # balanced themes within each split, in random order
        themes += [THEMES[i] for i in rng.permutation(np.arange(n) % len(THEMES))]

    rows: dict[str, list[tuple[str, float, str]]] = {"train": [], "test": []}
    for i, theme in enumerate(themes):
        params = {k: float(rng.random()) for k in ("exposure", "saturation", "blur", "noise", "jpeg")}
        source = THEME_SOURCES[theme][int(rng.integers(len(THEME_SOURCES[theme])))]
        image_rng = np.random.default_rng(rng.integers(2 ** 63))
        data, score = render_image(photos[source], theme, params, image_rng, size)
        name = f"demo_{i:05d}.jpg"
        yield f"images/{name}", data
        rows["train" if i < n_train else "test"].append((name, round(score, 2), theme))

    for split, split_rows in rows.items():
        yield f"merge/{split}.csv", _csv_bytes(split_rows)
        for theme in THEMES:
            theme_rows = [r for r in split_rows if r[2] == theme]
            if theme_rows:
                yield f"unmerge/{split}/{theme}.csv", _csv_bytes(theme_rows)


def _csv_bytes(rows: list[tuple[str, float, str]]) -> bytes:
    return ("image,score\n" + "".join(f"{name},{score:.2f}\n" for name, score, _ in rows)).encode("utf-8")


def _read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(root: Path, params: dict) -> bool:
    """Whether root's manifest says it holds a generation with ``params``, every file there with its size."""
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("params") != params:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        try:
            if (root / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


class GenerationError(ValueError):
    """A folder a generator may not write into: it holds files the generator did not write."""


@contextlib.contextmanager
def generation_lock(root: Path) -> Iterator[None]:
    """Serialise generation between processes sharing root (POSIX; no lock elsewhere). The lock is
    on the folder itself, so nothing is created in it."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _own_files(root: Path, generator: str) -> dict[str, tuple[int, str | None]] | None:
    """{relative path: (size, sha256 or None)} of the files ``generator`` wrote into root, as its manifest
    and its journal (an interrupted generation's) list them; None when root holds a manifest that is
    not ``generator``'s."""
    own: dict[str, tuple[int, str | None]] = {}
    if (root / _MANIFEST).exists():
        manifest = _read_manifest(root)
        if manifest is None or manifest.get("generator") != generator or not isinstance(manifest.get("files"), dict):
            return None
        digests = manifest.get("sha256")  # absent in manifests of earlier versions: sizes only
        for rel, size in manifest["files"].items():
            own[rel] = (size, digests.get(rel) if isinstance(digests, dict) else None)
    try:
        lines = (root / _JOURNAL).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rel, size, digest = json.loads(line)
        except (ValueError, TypeError):
            continue  # a line cut short when the process was killed: its file was not written yet
        own[rel] = (size, digest)
    return own


def _is_own(path: Path, rel: str, own: dict[str, tuple[int, str | None]]) -> bool:
    """Whether the file at ``path`` is one the generator wrote: listed with that size and digest, or the
    temp file of an interrupted atomic write of a listed file (or of the manifest)."""
    if path.is_symlink() or not path.is_file():
        return False
    if rel in own:
        size, digest = own[rel]
        return path.stat().st_size == size and (digest is None or sha256_file(path) == digest)
    temp = _TEMP_NAME.fullmatch(path.name)
    if temp is None:
        return False
    target = (Path(rel).parent / temp.group(1)).as_posix()
    return target in own or target == _MANIFEST


def _clear_own_files(root: Path, generator: str) -> None:
    """Delete what ``generator`` wrote into root before (the files its manifest and journal list, with the
    sizes and digests it wrote); GenerationError, with nothing deleted, when root holds anything else."""
    own = _own_files(root, generator)
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):  # in name order, so the first file named is always the same
        dirs.sort()
        base = Path(folder)
        for name in sorted(names + [d for d in dirs if (base / d).is_symlink()]):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if rel == _OLD_LOCK:
                continue
            if own is None:  # a manifest not ours (or unreadable): it vouches for nothing here
                rel = _MANIFEST
            elif rel == _JOURNAL or rel == _MANIFEST or _is_own(path, rel, own):
                found.append(path)
                continue
            raise GenerationError(f"{root} holds {rel}, which {generator} did not write (it writes only into a new "
                                  f"or empty folder, or one of its own); nothing was changed: choose another folder")
    for path in found:
        path.unlink(missing_ok=True)


def demo_parameters(n_train: int, n_test: int, seed: int, size: int) -> dict:
    """The generation parameters recorded in the manifest (a change regenerates the data)."""
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("size", size, 32)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"demo data: {name} must be an integer >= {low}, got {value!r}")
    if size > 2048:
        raise ValueError(f"demo data: size must be <= 2048, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"demo data: seed must be a non-negative integer, got {seed!r}")
    rules = json_text(SCORE_RULES, sort_keys=True).encode("utf-8")
    return {"version": GENERATOR_VERSION, "n_train": int(n_train), "n_test": int(n_test),
            "seed": int(seed), "size": int(size), "rules_sha256": hashlib.sha256(rules).hexdigest()}


def ensure_demo_dataset(root: str | os.PathLike | None = None, *, n_train: int = 480, n_test: int = 160,
                        seed: int = 0, size: int = 256) -> Path:
    """Generate the demo data under root (default data/demo of the repo) unless a complete copy
    made with the same parameters is there; return root.

    Layout: root/images/*.jpg, root/merge/{train,test}.csv, root/unmerge/{train,test}/<theme>.csv.
    Same parameters -> byte-identical files.  The manifest is written last, so an interrupted
    generation is detected and redone.
    """
    params = demo_parameters(n_train, n_test, seed, size)
    return ensure_generated(Path(root) if root is not None else DEFAULT_DEMO_ROOT, params, "demo_data.py",
                            f"the demo data set ({n_train} train + {n_test} test images)",
                            generate=lambda: _generate(n_train, n_test, seed, size))


def ensure_generated(root: Path, params: dict, generator: str, what: str, *,
                     generate: Callable[[], Iterable[tuple[str, bytes]]]) -> Path:
    """``root`` holding a complete generation with ``params``: kept if its manifest says so, else made
    under the generation lock. ``generate`` gives the files as (relative path, bytes).

    Only what ``generator`` wrote is ever removed (the files its manifest lists, with their sizes and
    digests): a folder holding anything else is refused (GenerationError) and left as it is. Each file
    is entered in a journal before it is written (atomically), and the manifest is written last, so an
    interrupted generation is detected and redone.
    """
    if is_complete(root, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with generation_lock(root):
        if is_complete(root, params):  # another process made it while we waited
            return root
        _clear_own_files(root, generator)
        logger.warning("generating %s in %s", what, root)
        sizes: dict[str, int] = {}
        digests: dict[str, str] = {}
        with open(root / _JOURNAL, "a", encoding="utf-8") as journal:
            for rel, data in generate():
                digest = hashlib.sha256(data).hexdigest()
                journal.write(json_text([rel, len(data), digest]) + "\n")
                journal.flush()  # listed before it exists: a killed run leaves only files it can vouch for
                with atomic_write(root / rel, "wb", sync=False) as f:  # the manifest, written last, is synced
                    f.write(data)
                sizes[rel], digests[rel] = len(data), digest
        atomic_save_json({"generator": generator, "params": params, "files": sizes, "sha256": digests},
                         root / _MANIFEST)
        (root / _JOURNAL).unlink()
    return root
