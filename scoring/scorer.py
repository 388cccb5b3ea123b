"""The ``Scorer``: batch-independent 1..10 scores of images, paths or tensors, by a PyTorch TANet or an
``.onnx`` export (onnxruntime, without torch), batch by batch, in input order.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from helpers.console import progress as progress_bar
from imagedata.images import DataError, EvalTransform, load_image, to_rgb
from scoring.onnx_model import ExportError, OnnxModel, is_onnx_file
from helpers.preprocessing import INPUT_SHAPE, INPUT_SIZE
from models.registry import PretrainedCfg, get_pretrained_cfg, list_models, list_variants
from helpers.runtime import AMP_MODES, precision_name, resolve_amp, resolve_device
from helpers.safe_io import CheckpointError
from util import distribution_std
from scoring.errors import ScoringError, ScoringWarning
from scoring.inputs import RefusedImage
from scoring.results import ScoreResult

if TYPE_CHECKING:  # torch, engine and models are imported where a PyTorch model is scored: an .onnx needs none
    import torch
    from torch import Tensor

    from models import TANet

ImageSource = Union[str, os.PathLike, Image.Image, "RefusedImage"]

NO_WEIGHTS_HELP = (
    "no TANet weights given: pass --model with a registered model (" + ", ".join(list_models(pretrained=True))
    + ", add --pretrained to fetch its released weights) or --path_to_model_weight with a checkpoint, either a "
    "released one (" + ", ".join(f"{get_pretrained_cfg(v).weight_file} for variant {v}" for v in ("tad66k", "ava"))
    + "; put it in checkpoints/ or add --download to fetch it), or one you trained with main_nni.py "
    "(runs/<name>/best.pth)"
)
BATCH_FUSION_WARNING = (
    "theme_fusion='batch' (the reference's scoring): each image's score depends on the other images of its "
    "batch, so on the batch size and the input order; use the default 'isolated' for per-image scores"
)


# --------------------------------------------------------------------------- loading images

class _ImageSources:
    """Paths or PIL images -> (index, normalised tensor or array or None, error or None); a DataLoader's
    dataset, or read in threads for an ONNX model (``_read_batches``)."""

    def __init__(self, sources: Sequence[ImageSource], transform: Any, draft: tuple[int, int] | None = None) -> None:
        self.sources = sources
        self.transform = transform
        self.draft = draft

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, Tensor | np.ndarray | None, str | None]:
        source = self.sources[index]
        if isinstance(source, RefusedImage):
            return index, None, source.reason
        try:
            image = to_rgb(source) if isinstance(source, Image.Image) else load_image(source, draft=self.draft)
            return index, self.transform(image), None
        except DataError as exc:  # the message names the file
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
            return index, None, f"image {_name(source, index)} could not be prepared: {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, Tensor | np.ndarray | None, str | None]]) -> dict[str, Any]:
    good = [(i, t) for i, t, _ in items if t is not None]
    return {
        "index": [i for i, _, _ in items],
        "errors": {i: e for i, _, e in items if e is not None},
        "good": [i for i, _ in good],
        "images": _stack([t for _, t in good]) if good else None,
    }


def _stack(images: list[Tensor] | list[np.ndarray]) -> Tensor | np.ndarray:
    """A batch of numpy arrays (an ONNX model's) or of tensors, stacked as what they are."""
    if isinstance(images[0], np.ndarray):
        return np.stack(images)
    import torch

    return torch.stack(images)


def _read_batches(dataset: _ImageSources, batch_size: int, workers: int) -> Iterator[dict[str, Any]]:
    """``_collate``d batches of ``dataset`` in order, without torch: read by ``workers`` threads (Pillow
    decodes and resizes without holding the GIL), at most ``workers`` batches ahead of the model."""
    def batch(start: int) -> dict[str, Any]:
        return _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    starts = range(0, len(dataset), batch_size)
    if workers == 0:
        yield from map(batch, starts)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        ahead: deque[Future[dict[str, Any]]] = deque()
        for start in starts:
            ahead.append(pool.submit(batch, start))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _name(source: Any, index: int) -> str:
    if isinstance(source, RefusedImage):
        return source.path
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<image {index}>"
    return str(source)


# --------------------------------------------------------------------------- the scorer

class Scorer:
    """A TANet ready to score images on the 1..10 scale.

    ``weights``: a checkpoint path, a released file's name (looked up in ``checkpoints_dir``,
    downloaded there with ``download=True``) or a registry name (``tanet-ava``: its released weights,
    from the user cache or ``checkpoints/``, fetched into the user cache with ``pretrained=True``).
    The variant is read from the checkpoint; ``variant``
    is only needed when it cannot be told, and must agree with it otherwise.
    ``theme_fusion="isolated"`` scores every image alone (independent of batch and order);
    ``"batch"`` is the reference's batch-coupled scoring. ``fast`` (the default) scores with an
    inference copy whose BatchNorm is folded into the convolutions and whose convolutions run fused
    with their activations, channels-last. ``amp="none"`` (the default) scores in float32, so a
    photo's score does not depend on the CPU; ``"bf16"`` or ``"auto"`` (bf16 where the device has
    it) are faster and move scores by up to about 0.06 on the 1..10 scale. The fusion head and the
    score always run in float32. ``draft``: decode JPEGs at a reduced size (faster; other pixels).
    An ``.onnx`` export (``tools/export.py``) scores in onnxruntime on the CPU in float32, without torch
    (``requirements-score.txt`` is enough), with ``threads`` CPU threads (default: the usable cores).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None,
        *,
        variant: str | None = None,
        device: str = "auto",
        theme_fusion: str = "isolated",
        batch_size: int = 32,
        amp: str = "none",
        fast: bool = True,
        draft: bool = False,
        num_workers: int = 0,
        allow_unsafe_load: bool = False,
        checkpoints_dir: str | os.PathLike | None = None,
        download: bool = False,
        threads: int | None = None,
        pretrained: bool = False,
    ) -> None:
        if weights is None or str(weights) == "":
            raise ScoringError(NO_WEIGHTS_HELP)
        if variant is not None and variant not in list_variants():
            raise ScoringError(f"unknown variant {variant!r}; expected one of {list_variants()}")
        if is_onnx_file(weights):  # onnxruntime, numpy and Pillow only: torch is never imported
            self._setup_onnx(Path(weights), variant, device, theme_fusion, batch_size, num_workers, draft, threads)
            return
        from models import TANet, load_tanet, resolve_weights

        target = resolve_device(device)
        amp = _resolve_amp(amp, target)
        _check_options(target, theme_fusion, batch_size, amp, num_workers)  # before the slow part
        path = resolve_weights(weights, directory=checkpoints_dir, download_missing=download or pretrained)
        try:
            # isolated scores never run the theme ResNet and its heads: they are not built or loaded
            model, _ = load_tanet(path, variant=variant, theme_fusion=theme_fusion, allow_unsafe=allow_unsafe_load,
                                  theme_network=theme_fusion == "batch", model_class=TANet)
        except CheckpointError as exc:
            raise ScoringError(str(exc)) from None
        # its own model: in scoring mode for good, so that threads sharing this scorer never switch it
        self._setup(model.to(target).eval(), target, theme_fusion, batch_size, amp, num_workers, fast, draft)
        self.checkpoint: Path | None = path

    @classmethod
    def from_model(
        cls,
        model: TANet,
        *,
        device: str | torch.device | None = None,
        theme_fusion: str = "isolated",
        batch_size: int = 32,
        amp: str = "none",
        fast: bool = False,
        draft: bool = False,
        num_workers: int = 0,
    ) -> "Scorer":
        """A scorer for an in-memory TANet. It is used where it is (``device`` None) or moved to
        ``device``; its eval/train mode and ``theme_fusion`` are set only while scoring. With ``fast``,
        an inference copy of it as it is now scores (later changes to the model are not seen)."""
        import torch

        from models import TANet

        if not isinstance(model, TANet):
            raise TypeError(f"Scorer.from_model needs a TANet, got {type(model).__name__}")
        self = cls.__new__(cls)
        if device is None:
            target = next(model.parameters()).device
        else:
            target = device if isinstance(device, torch.device) else resolve_device(device)
        amp = _resolve_amp(amp, target)
        _check_options(target, theme_fusion, batch_size, amp, num_workers)
        model.to(target)
        self._setup(model, target, theme_fusion, batch_size, amp, num_workers, fast, draft)
        self.checkpoint = None
        return self

    def _setup(self, model: TANet, device: torch.device, theme_fusion: str, batch_size: int, amp: str,
               num_workers: int, fast: bool, draft: bool) -> None:
        self.model = model
        self.device = device
        self.theme_fusion = theme_fusion
        self.batch_size = batch_size
        self.amp = amp
        self.fast = bool(fast)
        self.num_workers = num_workers
        self.pretrained_cfg: PretrainedCfg = get_pretrained_cfg(model.variant)
        self.transform = EvalTransform(self.pretrained_cfg.transform)
        self.draft = (INPUT_SIZE, INPUT_SIZE) if draft else None
        if self.fast:  # the inference copy of --fold_bn --fuse_conv --channels_last, in this scorer's fusion
            from training.engine import evaluation_model

            model.theme_fusion = theme_fusion
            self._net = evaluation_model(model, device, fold_bn=True, fuse_conv=True, amp=amp, channels_last=True)
        else:
            self._net = model
        if theme_fusion == "batch":
            warnings.warn(BATCH_FUSION_WARNING, ScoringWarning, stacklevel=3)

    def _setup_onnx(self, path: Path, variant: str | None, device: Any, theme_fusion: str,
                    batch_size: int, num_workers: int, draft: bool, threads: int | None) -> None:
        """Score with an ONNX export (tools/export.py) in onnxruntime, on the CPU, without torch."""
        if theme_fusion != "isolated":
            raise ScoringError(f"{path} is an ONNX export: it scores with isolated theme fusion only")
        if str(device).strip().lower() not in ("auto", "cpu"):
            raise ScoringError(f"{path} is an ONNX export: it runs on the CPU (--device cpu)")
        _check_options(None, theme_fusion, batch_size, "none", num_workers)
        try:
            model = OnnxModel(path, threads=threads)
        except ExportError as exc:
            raise ScoringError(str(exc)) from None
        if variant not in (None, model.variant):
            raise ScoringError(f"{path} is a {model.variant!r} model, but variant {variant!r} was asked for; drop "
                               f"--variant (it is read from the file) or pick the right file")
        self._setup(model, model.device, theme_fusion, batch_size, "none", num_workers, False, draft)
        self.checkpoint = path

    @property
    def path(self) -> str:
        """How this scorer computes: theme fusion, model path, precision, decoding."""
        parts = [f"{self.theme_fusion} theme fusion"]
        if isinstance(self.model, OnnxModel):
            parts.append("onnxruntime")
        if self.fast:
            from training.engine import fuses_conv

            fused = fuses_conv(True, self.device, self.amp)
            parts.append("folded BatchNorm" + (", fused convolutions" if fused else "") + ", channels-last")
        parts.append(precision_name(self.amp))
        parts.append("reduced-size JPEG decoding" if self.draft else "full decoding")
        return ", ".join(parts) + f", on {self.device}"

    @property
    def variant(self) -> str:
        return self.model.variant

    def __repr__(self) -> str:
        source = f"checkpoint={str(self.checkpoint)!r}" if self.checkpoint else "in-memory model"
        return (f"Scorer({source}, variant={self.variant!r}, device={str(self.device)!r}, "
                f"theme_fusion={self.theme_fusion!r}, batch_size={self.batch_size}, amp={self.amp!r}, "
                f"fast={self.fast})")

    # ---- public scoring

    def score(self, x: Any) -> float | list[float]:
        """Score(s) on 1..10 of a path, PIL image or (3, 224, 224) tensor (a float), or of a list of
        paths / images or a (B, 3, 224, 224) tensor (a list). Raises ScoringError for a bad image."""
        single = _is_single(x)
        results = self.score_detailed(x)
        failed = next((r for r in results if r.error is not None), None)
        if failed is not None:
            raise ScoringError(failed.error)
        scores = [r.score for r in results]
        return scores[0] if single else scores

    def score_detailed(self, x: Any) -> list[ScoreResult]:
        """One ScoreResult per image, in input order; bad images carry an ``error`` and no score."""
        if _is_tensor(x):
            return list(self._tensor_results(x))
        sources = [x] if _is_single(x) else _check_sources(x)
        return list(self.iter_results(sources))

    def iter_results(self, sources: Sequence[ImageSource], *, progress: bool = False) -> Iterator[ScoreResult]:
        """Stream ScoreResults, in order, for paths or PIL images: images are loaded batch by
        batch (``num_workers`` loader processes) and dropped once scored."""
        if not sources:
            return
        onnx = isinstance(self._net, OnnxModel)
        dataset = _ImageSources(sources, self.transform.array if onnx else self.transform, self.draft)
        batches = math.ceil(len(sources) / self.batch_size)
        workers = min(self.num_workers, batches - 1)  # one batch: nothing to overlap its decoding with
        if onnx:  # no torch: decoding threads instead of DataLoader processes
            loader = _read_batches(dataset, self.batch_size, workers)
        else:
            from torch.utils.data import DataLoader

            loader = DataLoader(
                dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", **({"prefetch_factor": 2} if workers else {}),
            )
        show = progress and len(sources) > self.batch_size
        with progress_bar(total=len(sources), unit="img", desc="scoring", enabled=show) as bar:
            for batch in loader:
                outputs = self._forward(batch["images"]) if batch["images"] is not None else None
                row_of = {i: r for r, i in enumerate(batch["good"])}
                for i in batch["index"]:
                    name = _name(sources[i], i)
                    if i in batch["errors"]:
                        yield ScoreResult(image=name, error=batch["errors"][i])
                    else:
                        yield self._result(name, outputs[row_of[i]])
                bar.update(len(batch["index"]))

    # ---- internals

    def _forward(self, images: Tensor | np.ndarray) -> Tensor | np.ndarray:
        if isinstance(self._net, OnnxModel):  # always isolated, always inference; arrays in, arrays out
            return self._net(images)
        import torch

        from helpers.runtime import autocast, to_device

        with torch.no_grad(), self._scoring_mode(), autocast(self.device, self.amp):
            out = self._net(to_device(images, self.device, channels_last=self.fast))
        return out.float().cpu()

    @contextlib.contextmanager
    def _scoring_mode(self) -> Iterator[None]:
        """Eval mode and this scorer's theme fusion, restored afterwards (the model may be shared); a
        model already so is not touched (threads may score with it at once)."""
        net = self._net
        if isinstance(net, OnnxModel) or (not net.training and net.theme_fusion == self.theme_fusion):
            yield  # an ONNX model (always isolated, always inference), or one already in scoring mode
            return
        was_training, fusion = net.training, net.theme_fusion
        net.eval()
        net.theme_fusion = self.theme_fusion
        try:
            yield
        finally:
            net.theme_fusion = fusion
            net.train(was_training)

    def _result(self, name: str, output: Tensor | np.ndarray) -> ScoreResult:
        values = np.asarray(output, dtype=np.float64)
        if not np.isfinite(values).all():
            return ScoreResult(image=name, error=f"image {name}: the model gave a non-finite output {values.tolist()}")
        score = float(self.pretrained_cfg.scores_1_to_10(values))
        if not self.pretrained_cfg.is_distribution:
            return ScoreResult(image=name, score=score)
        return ScoreResult(image=name, score=score, std=float(distribution_std(values)),
                           distribution=tuple(float(v) for v in values))

    def _tensor_results(self, x: Tensor) -> Iterator[ScoreResult]:
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ScoringError(f"a tensor to score must be (3, 224, 224) or (B, 3, 224, 224), ImageNet-normalised; "
                               f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ScoringError(f"a tensor to score must be floating point (normalised), got {x.dtype}")
        for start in range(0, x.shape[0], self.batch_size):
            outputs = self._forward(x[start:start + self.batch_size].float())
            for offset, output in enumerate(outputs):
                yield self._result(f"tensor[{start + offset}]", output)


def _resolve_amp(amp: str, device: torch.device) -> str:
    try:
        return resolve_amp(amp, device)
    except ValueError:
        raise ScoringError(f"amp must be one of {AMP_MODES}, got {amp!r}") from None


def _check_options(device: torch.device | None, theme_fusion: str, batch_size: int, amp: str,
                   num_workers: int) -> None:
    """ScoringError for a bad option; ``device`` None (an ONNX model): no precision check."""
    if theme_fusion not in ("batch", "isolated"):
        raise ScoringError(f"theme_fusion must be 'isolated' or 'batch', got {theme_fusion!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ScoringError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if amp not in AMP_MODES:
        raise ScoringError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if device is not None:
        from helpers.runtime import autocast

        autocast(device, amp)  # refuses fp16 on the CPU now rather than at the first batch


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (no tensor exists before torch is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_single(x: Any) -> bool:
    if _is_tensor(x):
        return x.ndim == 3
    return isinstance(x, (str, os.PathLike, Image.Image))


def _check_sources(x: Any) -> list[ImageSource]:
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"cannot score a {type(x).__name__}: give a path, a PIL image, a tensor, "
                        f"or a list of paths / PIL images")
    for i, item in enumerate(x):
        if not isinstance(item, (str, os.PathLike, Image.Image, RefusedImage)):
            raise TypeError(f"item {i} of the list is a {type(item).__name__}, not a path or PIL image "
                            f"(stack tensors into one (B, 3, 224, 224) tensor)")
    return list(x)
