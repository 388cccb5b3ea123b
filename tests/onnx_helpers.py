"""Helpers of the ONNX tests: a tiny ONNX graph with a TANet export's interface and metadata (built in
milliseconds, unlike an export), the numpy scores it gives, and a Python process in which torch and the
other heavy packages cannot be imported (what a ``requirements-score.txt`` install has)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "pandas", "scipy", "requests", "onnx", "onnxscript", "sklearn", "matplotlib")

# Put before a script: any import of a BLOCKED package (or of its submodules) raises ImportError.
BLOCKER = f"""
import sys
BLOCKED = {BLOCKED!r}
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the light scoring path must not import it")
        return None
sys.meta_path.insert(0, _Blocked())
sys.path.insert(0, {str(REPO)!r})
"""


def needs_onnx() -> None:
    """Skip unless onnx (to build the tiny graph) and onnxruntime (to run it) are installed."""
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"the ONNX tests need {module} (pip install -r requirements-deploy.txt)")


def tiny_weights(width: int) -> np.ndarray:
    return np.random.RandomState(width).standard_normal((3, width)).astype(np.float32)


def tiny_onnx(path: Path, *, variant: str = "tad66k", width: int | None = None, input_name: str = "image",
              size: int = 224, metadata: dict[str, str] | None = None) -> Path:
    """An ONNX file that takes ``input_name`` (N, 3, size, size) and gives ``output`` (N, width): the mean
    of each channel times fixed weights, through a sigmoid (width 1) or a softmax; the metadata of a
    ``variant`` export, with ``metadata`` changed or added (None values remove a key)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = width or (1 if variant == "tad66k" else 10)
    nodes = [helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["output"]) if width == 1
             else helper.make_node("Softmax", ["logits"], ["output"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny_tanet",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(tiny_weights(width), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    info = {"tanet.format": "tanet-onnx/1", "tanet.variant": variant, "tanet.branches": "aesthetics,rgb",
            "tanet.theme_fusion": "isolated"}
    info.update(metadata or {})
    for key, value in info.items():
        if value is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def tiny_outputs(batch: np.ndarray, width: int) -> np.ndarray:
    """What ``tiny_onnx`` gives for a (N, 3, H, W) batch, in float64."""
    logits = batch.astype(np.float64).mean(axis=(2, 3)) @ tiny_weights(width).astype(np.float64)
    if width == 1:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run_torch_free(script: str, *, cwd: Path, timeout: float = 300) -> dict:
    """Run ``script`` in a fresh Python in which the BLOCKED packages cannot be imported; the script
    prints one JSON object as its last line, returned here (with ``modules``: the BLOCKED ones that
    ended up imported, which must be none)."""
    code = BLOCKER + script + """
import json as _json
print(_json.dumps({**result, "modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
