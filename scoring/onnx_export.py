"""A trained TANet as an ONNX file that runs without this code, and the onnxruntime model that scores
with one.

The file holds the isolated model (every image scored alone, so scores never depend on batch-mates;
the theme ResNet, which cannot change an isolated score, is left out), a dynamic batch axis, two
outputs (``output``: the model's own output; ``score``: the score on 1..10) and, in its metadata, the
preprocessing contract and what the outputs mean. Before the file is written, onnxruntime's outputs
are compared with PyTorch's on a random batch: an export that does not agree (or gives non-finite
outputs) is refused and nothing is written. ``onnx`` and ``onnxruntime`` are an optional extra
(``requirements-deploy.txt``); scoring with the file is ``onnx_model.OnnxModel``, without torch.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from models import TANet, get_pretrained_cfg, load_tanet
from scoring.onnx_model import ONNX_FORMAT, ExportError, OnnxModel, require
from helpers.preprocessing import INPUT_SHAPE
from helpers.safe_io import atomic_write, json_text, sha256_file

__all__ = ["ONNX_FORMAT", "OPSET", "PARITY_TOLERANCE", "ExportError", "Exported", "OnnxModel", "export_onnx",
           "metadata", "read_metadata"]

OPSET = 18
PARITY_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| over the outputs of a random batch


class Exported(NamedTuple):
    """What ``export_onnx`` wrote: the file's metadata, and the max |onnxruntime - PyTorch| difference
    of the outputs of a random batch of 3."""

    metadata: dict[str, str]
    max_difference: float


class _WithScore(nn.Module):
    """TANet's output and the score on 1..10, the two outputs of the exported graph."""

    def __init__(self, model: TANet) -> None:
        super().__init__()
        self.model = model
        self.cfg = get_pretrained_cfg(model.variant)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(image)
        return output, self.cfg.scores_1_to_10(output)


def metadata(model: TANet, checkpoint: Path) -> dict[str, str]:
    """The metadata an exported file carries (string values, as ONNX stores them)."""
    preset = get_pretrained_cfg(model.variant)
    outputs = {"output": f"(N, {preset.outputs}) {preset.output_meaning}", "score": "(N,) the score on 1..10"}
    return {
        "tanet.format": ONNX_FORMAT,
        "tanet.variant": model.variant,
        "tanet.branches": ",".join(model.branches),
        "tanet.theme_fusion": "isolated",
        "tanet.preprocessing": json_text(preset.preprocessing),
        "tanet.outputs": json_text(outputs),
        "tanet.source_checkpoint": checkpoint.name,
        "tanet.source_sha256": sha256_file(checkpoint),
    }


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, variant: str | None = None,
                allow_unsafe: bool = False) -> Exported:
    """Export a TANet checkpoint (ours or released, either variant, any branches) to ``out`` (written
    atomically, only once onnxruntime agrees with PyTorch within ``PARITY_TOLERANCE``: else ExportError
    and nothing written)."""
    onnx = require("onnx")
    require("onnxscript")
    ort = require("onnxruntime")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: name the file .onnx")
    model, _ = load_tanet(checkpoint, variant=variant, theme_fusion="isolated", theme_network=False,
                          allow_unsafe=allow_unsafe)
    x, ref = _reference_outputs(model.eval(), checkpoint)  # before the slow export: broken weights fail at once
    wrapped = _WithScore(model)
    example = torch.zeros(2, *INPUT_SHAPE)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(wrapped, (example,), input_names=["image"], output_names=["output", "score"],
                                    dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET, verbose=False)
    proto = program.model_proto
    info = metadata(model, checkpoint)
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    difference = _parity(ort.InferenceSession(data, providers=["CPUExecutionProvider"]), x, ref, checkpoint)
    with atomic_write(out, "wb") as f:
        f.write(data)
    return Exported(info, difference)


def _reference_outputs(model: TANet, checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of 3 and PyTorch's outputs for it; ExportError when they are not finite."""
    x = torch.randn(3, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    if not np.isfinite(ref).all():
        raise ExportError(f"{checkpoint} gives non-finite outputs (NaN or infinity) on a random batch: its weights "
                          f"are broken; no ONNX file written")
    return x.numpy(), ref


def _parity(session: object, x: np.ndarray, ref: np.ndarray, checkpoint: Path) -> float:
    """Max |onnxruntime - PyTorch| over the outputs of the batch ``x``; ExportError when it is not finite
    or above ``PARITY_TOLERANCE``."""
    (got,) = session.run(["output"], {"image": x})
    difference = float(np.abs(got - ref).max())
    if not math.isfinite(difference) or difference > PARITY_TOLERANCE:
        raise ExportError(f"the ONNX export of {checkpoint} differs from PyTorch by {difference:.1e} on a random "
                          f"batch (tolerance {PARITY_TOLERANCE:.0e}); no ONNX file written")
    return difference


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The TANet metadata of an ONNX file, read with ``onnx`` (no session)."""
    onnx = require("onnx")
    with open(path, "rb") as f:
        proto = onnx.load_model(io.BytesIO(f.read()), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
