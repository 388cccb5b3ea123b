"""Helpers of the reliability tests: a tiny stand-in for TANet, and the child-process entry point
that runs ``main_nni.main(argv)`` and, when asked, SIGKILLs itself at a chosen point of an output
write, so a test can hit "killed while writing a checkpoint" deterministically.

A hook is ``(kind, suffix, nth)``: on the ``nth`` atomic write (1-based, counted in this process)
of a file whose name ends with ``suffix``, die

* ``"partial"``: with only part of the temp file on disk (1 MiB of a large file, else half of it),
* ``"before_replace"``: with the temp file complete but not yet renamed onto its name,
* ``"after_replace"``: right after the rename, before anything else happens.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import main_nni
from helpers import safe_io
from models import BRANCHES, TANet, get_pretrained_cfg

PARTIAL_BYTES = 1 << 20


class MarkerPayload:
    """Unpickles to a call of pathlib.Path.touch(marker): loading it runs code (an untrusted pickle)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_jpeg(path: pathlib.Path, seed: int) -> pathlib.Path:
    """A 24x24 random JPEG."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def write_csv_data(folder: pathlib.Path, n: int, themes: str) -> pathlib.Path:
    """folder/images with n JPEGs, folder/train.csv and folder/test.csv (image,score,theme) listing them all
    (themes cycling through the letters of ``themes``); returns folder."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        write_jpeg(images / f"im{i}.jpg", i)
        rows.append(f"im{i}.jpg,{2 + i},{themes[i % len(themes)]}")
    text = "image,score,theme\n" + "\n".join(rows) + "\n"
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text(text)
    return folder


class TinyTANet(TANet):
    """TANet's interface (variant, theme_fusion, the six parameter groups, frozen theme branch,
    (B, 3, 224, 224) -> (B, 1) sigmoid or (B, 10) softmax) at a tiny fraction of the cost.

    It has what makes resuming non-trivial: BatchNorm statistics and dropout (torch's RNG).
    """

    def __init__(self, variant: str = "tad66k", theme_fusion: str = "batch", **_: Any) -> None:
        nn.Module.__init__(self)
        self.variant = variant
        self.spec = get_pretrained_cfg(variant)
        self.branches, self.has_theme_network = BRANCHES, True
        self.theme_fusion = theme_fusion
        self.res365_last = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.hypernet = nn.Linear(4, 4)
        self.tygertnet = nn.Linear(4, 4)
        self.mobileNet = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head_rgb = nn.Linear(3 * 4 * 4, 4)
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(12, self.spec.outputs))

    def forward(self, x: Tensor) -> Tensor:
        small = F.adaptive_avg_pool2d(x, 8)
        theme = self.tygertnet(torch.tanh(self.hypernet(self.res365_last(small).mean((2, 3)))))
        if self.theme_fusion == "isolated":
            theme = torch.zeros_like(theme)
        rgb = self.head_rgb(F.adaptive_avg_pool2d(small, 4).flatten(1))
        out = self.head(torch.cat([self.mobileNet(small).mean((2, 3)), theme, rgb], dim=1))
        return torch.sigmoid(out) if self.spec.outputs == 1 else torch.softmax(out, dim=1)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingFile:
    """A file proxy that dies once ``limit`` bytes are written, or at its first flush with half of
    what was written left on disk."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f, self._limit, self._written = f, limit, 0

    def write(self, data: Any) -> int:
        if self._written + len(data) >= self._limit:
            self._f.write(data[:self._limit - self._written])
            self._die_leaving(None)
        self._written += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()
        self._die_leaving(os.fstat(self._f.fileno()).st_size // 2)

    def _die_leaving(self, size: int | None) -> None:
        self._f.flush()
        if size is not None:
            os.ftruncate(self._f.fileno(), size)
        os.fsync(self._f.fileno())
        _die()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def install_hook(hook: tuple[str, str, int] | None) -> None:
    """Patch safe_io's atomic writes (and every module's reference to them) to die at ``hook``."""
    if hook is None:
        return
    kind, suffix, nth = hook
    seen = {"n": 0}

    def chosen(path: Any) -> bool:
        if not os.fspath(path).endswith(suffix):
            return False
        seen["n"] += 1
        return seen["n"] == nth

    if kind == "partial":
        real_atomic_write = safe_io.atomic_write

        @contextlib.contextmanager
        def atomic_write(path, mode="wb"):
            with real_atomic_write(path, mode) as f:
                if not chosen(path):
                    yield f
                    return
                dying = _DyingFile(f, PARTIAL_BYTES)
                yield dying
                dying.flush()  # the whole body fitted under the limit: die with half of it on disk

        for module in list(sys.modules.values()):  # safe_io (atomic_torch_save, atomic_save_json) and every importer
            if getattr(module, "atomic_write", None) is real_atomic_write:
                module.atomic_write = atomic_write
    elif kind in ("before_replace", "after_replace"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            die = chosen(dst)
            if die and kind == "before_replace":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if die:
                _die()

        os.replace = replace  # what safe_io.atomic_write calls
    else:
        raise ValueError(f"unknown hook kind {kind!r}")


def run_main(argv: list[str], hook: tuple[str, str, int] | None, log_path: str, tiny: bool) -> None:
    """Child entry point: output to ``log_path``, the hook, then exit with main_nni.main(argv)'s status."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if tiny:
        main_nni.TANet = TinyTANet
    install_hook(hook)
    code = main_nni.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def predict_peak_memory(image_list: str, weights: str, output: str) -> dict:
    """Run predict.py on `image_list` with TinyTANet standing in for TANet; peak resident memory
    (KiB) before and after, and its exit status."""
    import resource

    import models
    import predict

    models.TANet = TinyTANet  # the Scorer imports TANet from models when it loads a checkpoint
    torch.set_num_threads(1)
    with torch.no_grad():  # what every run allocates once: a batch through the model
        TinyTANet()(torch.zeros(32, 3, 224, 224))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        code = predict.main([image_list, "--path_to_model_weight", weights, "--output", output, "--num_workers", "0",
                             "--batch_size", "32", "--device", "cpu", "--quiet"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"code": code, "peak_kib_before": before, "peak_kib_after": after}


if __name__ == "__main__":  # python tests/reliability_helpers.py LIST WEIGHTS OUTPUT
    import json

    print(json.dumps(predict_peak_memory(*sys.argv[1:4])))
