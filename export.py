"""A trained TANet as an ONNX file that runs without this code, and the onnxruntime model that scores
with one.

The file holds the isolated model (every image scored alone, so scores never depend on batch-mates;
the theme ResNet, which cannot change an isolated score, is left out), a dynamic batch axis, two
outputs (``output``: the model's own output; ``score``: the score on 1..10) and, in its metadata, the
preprocessing contract and what the outputs mean. ``onnx`` and ``onnxruntime`` are an optional extra
(``requirements-deploy.txt``).
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models import TANet, load_tanet
from presets import INPUT_SHAPE, VARIANT_PRESETS, scores_1_to_10
from safe_io import atomic_write, sha256_file

ONNX_FORMAT = "tanet-onnx/1"
OPSET = 18
EXTRA_HINT = "install the optional extra: pip install -r requirements-deploy.txt"


class ExportError(ValueError):
    """An export or an ONNX file that cannot be used (the message names it)."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"the ONNX export and ONNX scoring need the package {module!r}: {EXTRA_HINT}") from None


class _WithScore(nn.Module):
    """TANet's output and the score on 1..10, the two outputs of the exported graph."""

    def __init__(self, model: TANet) -> None:
        super().__init__()
        self.model = model
        self.variant = model.variant

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(image)
        return output, scores_1_to_10(output, self.variant)


def metadata(model: TANet, checkpoint: Path) -> dict[str, str]:
    """The metadata an exported file carries (string values, as ONNX stores them)."""
    preset = VARIANT_PRESETS[model.variant]
    outputs = {"output": f"(N, {preset.outputs}) {preset.output_meaning}", "score": "(N,) the score on 1..10"}
    return {
        "tanet.format": ONNX_FORMAT,
        "tanet.variant": model.variant,
        "tanet.branches": ",".join(model.branches),
        "tanet.theme_fusion": "isolated",
        "tanet.preprocessing": json.dumps(preset.preprocessing),
        "tanet.outputs": json.dumps(outputs),
        "tanet.source_checkpoint": checkpoint.name,
        "tanet.source_sha256": sha256_file(checkpoint),
    }


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, variant: str | None = None,
                allow_unsafe: bool = False) -> dict[str, str]:
    """Export a TANet checkpoint (ours or released, either variant, any branches) to ``out`` (written
    atomically); returns the metadata written into the file."""
    onnx = _require("onnx")
    _require("onnxscript")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: name the file .onnx")
    model, _ = load_tanet(checkpoint, variant=variant, theme_fusion="isolated", theme_network=False,
                          allow_unsafe=allow_unsafe)
    wrapped = _WithScore(model.eval())
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
    with atomic_write(out, "wb") as f:
        f.write(proto.SerializeToString())
    return info


class OnnxModel:
    """An exported TANet run by onnxruntime on the CPU: called with a (B, 3, 224, 224) batch, it
    returns the model's output as a torch tensor, as TANet does."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise ExportError(f"ONNX file {self.path} cannot be loaded: {str(exc).splitlines()[0]}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("tanet.format") != ONNX_FORMAT:
            raise ExportError(f"{self.path} is not a TANet ONNX export of this project (no {ONNX_FORMAT!r} in its "
                              f"metadata): export one with tools/export.py")
        self.variant = self.metadata["tanet.variant"]
        self.branches = tuple(self.metadata["tanet.branches"].split(","))
        self.theme_fusion = "isolated"

    def __call__(self, images: Tensor) -> Tensor:
        batch = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        output, _ = self.session.run(["output", "score"], {"image": batch})
        return torch.from_numpy(output)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, variant={self.variant!r})"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The TANet metadata of an ONNX file, read with ``onnx`` (no session)."""
    onnx = _require("onnx")
    with open(path, "rb") as f:
        proto = onnx.load_model(io.BytesIO(f.read()), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
