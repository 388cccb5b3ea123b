"""Scoring a collection on Ray Data (``predict.py --engine ray``): the images read and decoded by Ray
tasks, the model in a pool of actors (a ``Scorer`` each, a GPU each with ``--device cuda``), the results
streamed back to the caller in input order, so that ``result_log.ResultLog`` writes (and resumes)
them as it does for the local engine.

Ray is the optional extra of requirements-scale.txt; nothing else imports this module.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.console import progress as progress_bar
from helpers.preprocessing import NUM_BINS
from scoring.errors import ScoringError
from scoring.inputs import RefusedImage
from scoring.results import SCALE_REQUIREMENTS, ScoreResult
from scoring.scorer import Scorer, _ImageSources

REPO = Path(__file__).resolve().parents[1]
DECODE_BYTES = 512 << 20  # a decoding worker (torch imported) and its batch, about


def check_available() -> None:
    """ScoringError naming requirements-scale.txt when Ray Data cannot be imported."""
    try:
        import ray.data  # noqa: F401 - the optional extra
    except ImportError:
        raise ScoringError(f"--engine ray needs Ray Data: pip install -r {SCALE_REQUIREMENTS}") from None


def start(address: str | None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    # the workers import this project's modules from where the driver has them (a cluster: the same path)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}}
    local = {} if address else {"include_dashboard": False}
    ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False, **local)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines among predict.py's


def describe() -> str:
    """The cluster as Ray sees it: nodes, CPUs, GPUs."""
    import ray

    resources = ray.cluster_resources()
    return (f"Ray {ray.__version__}, {len(ray.nodes())} node(s), {int(resources.get('CPU', 0))} CPUs, "
            f"{int(resources.get('GPU', 0))} GPUs")


def decode_batch(batch: dict[str, np.ndarray], transform: Any, draft: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """A Ray task: the model inputs of a batch of paths (zeros where an image failed) and the errors."""
    sources = [RefusedImage(p, r) if r else p for p, r in zip(batch["path"].tolist(), batch["refused"].tolist())]
    dataset = _ImageSources(sources, transform, draft)  # the local engine's decoding, errors per image
    pixels = np.zeros((len(sources), 3, 224, 224), np.float32)
    errors = []
    for i in range(len(sources)):
        _, tensor, error = dataset[i]
        if tensor is not None:
            pixels[i] = np.asarray(tensor)  # a tensor, or an array for an ONNX scorer
        errors.append(error or "")
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class ScoreActor:
    """A Ray actor: a Scorer built once, scoring the decoded batches it is given."""

    def __init__(self, weights: str, variant: str, device: str, theme_fusion: str, batch_size: int, amp: str,
                 fast: bool, threads: int, allow_unsafe_load: bool) -> None:
        torch.set_num_threads(threads)
        self.scorer = Scorer(weights, variant=variant, device=device, theme_fusion=theme_fusion,
                             batch_size=batch_size, amp=amp, fast=fast, allow_unsafe_load=allow_unsafe_load)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        score, std = np.full(n, np.nan), np.full(n, np.nan)
        dist = np.full((n, NUM_BINS), np.nan)
        errors = batch["error"].copy()
        good = [i for i in range(n) if not errors[i]]
        if good:
            results = self.scorer.score_detailed(torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])))
            for i, r in zip(good, results):
                if r.error is not None:
                    errors[i] = r.error.replace(r.image, str(batch["path"][i]))
                    continue
                score[i] = r.score
                if r.std is not None:
                    std[i], dist[i] = r.std, r.distribution
        return {"path": batch["path"], "score": score, "std": std, "distribution": dist, "error": errors}


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def iter_results(scorer: Scorer, images: Sequence[str | RefusedImage], *, address: str | None = None,
                 actors: int | None = None, allow_unsafe_load: bool = False,
                 progress: bool = False) -> Iterator[ScoreResult]:
    """Start (or join) Ray, then stream one ScoreResult per image, in input order, scored on Ray Data
    by ``actors`` copies of ``scorer``'s model (default: one per GPU with a CUDA scorer, else one)."""
    import ray

    start(address)
    if scorer.checkpoint is None:
        raise ScoringError("--engine ray scores a checkpoint file: the actors load it by its path")
    cuda = scorer.device.type == "cuda"
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if cuda else 1
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the results in input order, so a run resumes
    context.enable_progress_bars = False
    return _stream(scorer, images, actors, cuda, allow_unsafe_load, progress)


def _stream(scorer: Scorer, images: Sequence[str | RefusedImage], actors: int, cuda: bool, allow_unsafe_load: bool,
            progress: bool) -> Iterator[ScoreResult]:
    import ray

    if not images:
        return
    items = [{"path": str(image), "refused": image.reason if isinstance(image, RefusedImage) else ""}
             for image in images]
    batch = scorer.batch_size
    data = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch, 1000)))
    # decoding reserves the memory of its batch's model inputs: other remote arguments than the actors', so
    # Ray runs it in tasks of its own (anywhere in the cluster) rather than fused into the scoring actors
    data = data.map_batches(decode_batch, batch_size=batch, batch_format="numpy", memory=DECODE_BYTES,
                            fn_kwargs={"transform": scorer.transform, "draft": scorer.draft})
    data = data.map_batches(
        ScoreActor, batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if cuda else 0,
        fn_constructor_kwargs={
            "weights": str(scorer.checkpoint), "variant": scorer.variant, "device": "cuda" if cuda else "cpu",
            "theme_fusion": scorer.theme_fusion, "batch_size": batch, "amp": scorer.amp, "fast": scorer.fast,
            "threads": torch.get_num_threads(), "allow_unsafe_load": allow_unsafe_load})
    ava = scorer.pretrained_cfg.is_distribution
    with progress_bar(total=len(items), unit="img", desc="scoring", enabled=progress and len(items) > batch) as bar:
        for out in data.iter_batches(batch_size=None, batch_format="numpy"):
            for i, path in enumerate(out["path"].tolist()):
                if out["error"][i]:
                    yield ScoreResult(image=path, error=str(out["error"][i]))
                elif ava:
                    yield ScoreResult(image=path, score=float(out["score"][i]), std=_number(out["std"][i]),
                                      distribution=tuple(float(v) for v in out["distribution"][i]))
                else:
                    yield ScoreResult(image=path, score=float(out["score"][i]))
            bar.update(len(out["path"]))
