"""An exported TANet (``tools/export.py``) run by onnxruntime on the CPU, without torch: the file is
checked against what an export of this project holds (its format, variant, input and output), so that
a damaged or edited file is refused with one line naming it. ``onnxruntime`` (with numpy and Pillow)
is all that scoring an ``.onnx`` needs: ``pip install -r requirements-score.txt``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from helpers.preprocessing import INPUT_SHAPE
from models.registry import get_pretrained_cfg, list_variants
from helpers.runtime import usable_cpus
from helpers.safe_io import first_line

__all__ = ["ONNX_FORMAT", "ExportError", "OnnxDevice", "OnnxModel", "is_onnx_file", "require"]

ONNX_FORMAT = "tanet-onnx/1"
EXTRA_HINT = ("install the optional extra: pip install -r requirements-score.txt (scoring) or "
              "requirements-deploy.txt (export and scoring)")


class ExportError(ValueError):
    """An export or an ONNX file that cannot be used (the message names it)."""


def require(module: str) -> Any:
    """The optional package ``module``, or ExportError saying how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"the ONNX export and ONNX scoring need the package {module!r}: {EXTRA_HINT}") from None


def is_onnx_file(weights: str | os.PathLike | None) -> bool:
    """Whether the weights named are an ONNX export (by the ``.onnx`` extension, any case)."""
    return weights is not None and Path(weights).suffix.lower() == ".onnx"


class OnnxDevice(str):
    """Where an ONNX model runs, ``"cpu"``: a string with torch.device's ``type``, so that code asking a
    scorer's ``device.type`` works without torch."""

    @property
    def type(self) -> str:
        return str(self)


def _shape(arg: Any) -> str:
    dims = ["N" if not isinstance(d, int) else str(d) for d in arg.shape]
    return f"({', '.join(dims)})"


class OnnxModel:
    """An exported TANet run by onnxruntime on the CPU: called with a (B, 3, 224, 224) float32 batch
    (numpy, or a torch tensor), it returns the model's output (B, 1) or (B, 10) as the same kind, as
    TANet does. ExportError naming the file for one that is missing, unreadable or not as an export of
    this project is (format, variant, input ``image`` (N, 3, 224, 224) float32, output ``output`` of the
    variant's width)."""

    device = OnnxDevice("cpu")

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ExportError(f"ONNX file {self.path} is a folder; name the .onnx file tools/export.py wrote")
        if not self.path.is_file():
            raise ExportError(f"ONNX file {self.path} not found")
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise ExportError(f"ONNX file {self.path} cannot be loaded: {first_line(exc)}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("tanet.format") != ONNX_FORMAT:
            raise ExportError(f"{self.path} is not a TANet ONNX export of this project (no {ONNX_FORMAT!r} in its "
                              f"metadata): export one with tools/export.py")
        self.variant = self.metadata.get("tanet.variant")
        if self.variant not in list_variants():
            raise self._refused(f"its metadata names the variant {self.variant!r}, not one of "
                                f"{', '.join(list_variants())}")
        self.branches = tuple(self.metadata.get("tanet.branches", "").split(","))
        self.theme_fusion = "isolated"
        self._check_graph()

    def _refused(self, what: str) -> ExportError:
        return ExportError(f"ONNX file {self.path}: {what}; it is not as tools/export.py writes it: export the "
                           f"checkpoint again")

    def _check_graph(self) -> None:
        """The input and output a TANet export has: ``image`` (N, 3, 224, 224) float32 in, ``output``
        (N, outputs of the variant) float32 out."""
        inputs = self.session.get_inputs()
        want = f"one input 'image' (N, {', '.join(map(str, INPUT_SHAPE))}) float32"
        found = ", ".join(f"{i.name!r} {_shape(i)} {i.type}" for i in inputs) or "none"
        if (len(inputs) != 1 or inputs[0].name != "image" or inputs[0].type != "tensor(float)"
                or len(inputs[0].shape) != 4 or tuple(inputs[0].shape[1:]) != INPUT_SHAPE):
            raise self._refused(f"it takes {found}, not {want}")
        width = get_pretrained_cfg(self.variant).outputs
        outputs = {o.name: o for o in self.session.get_outputs()}
        out = outputs.get("output")
        if out is None:
            raise self._refused(f"it has no output 'output' (its outputs: {', '.join(map(repr, outputs)) or 'none'})")
        if out.type != "tensor(float)" or len(out.shape) != 2 or out.shape[1] != width:
            raise self._refused(f"its output 'output' is {_shape(out)} {out.type}, but variant {self.variant!r} "
                                f"gives (N, {width}) float32")

    def __call__(self, images: Any) -> Any:
        torch = sys.modules.get("torch")
        is_tensor = torch is not None and isinstance(images, torch.Tensor)
        if is_tensor:
            images = images.detach().to("cpu", torch.float32)
        batch = np.ascontiguousarray(images, dtype=np.float32)
        try:
            (output,) = self.session.run(["output"], {"image": batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise ExportError(f"ONNX file {self.path} failed on a batch of shape {batch.shape}: "
                              f"{first_line(exc)}") from None
        return torch.from_numpy(output) if is_tensor else output

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, variant={self.variant!r})"

