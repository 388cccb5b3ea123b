"""Inference copies whose convolutions run with their activation (and residual sum) fused in,
as oneDNN post-ops on the CPU (a speed path; use on a model whose BatchNorm is already folded)."""
from __future__ import annotations

import copy
import functools
import operator

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

# (oneDNN post-op, its scalars) per activation module or function
_ACTIVATIONS: dict[object, tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
    F.relu: ("relu", []),
    torch.relu: ("relu", []),
}
_ADDS = (operator.add, operator.iadd, torch.add)
# The backbones whose graphs are fused; the rest of TANet (theme head, RGB attention) has no convolutions.
_BACKBONES = ("res365_last", "mobileNet.base_model.0")


def conv_fusion_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this PyTorch and this CPU run oneDNN's fused convolution in ``dtype`` (bfloat16 needs
    AVX-512 or AVX-NE-CONVERT: a one-pixel convolution is tried once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return dtype == torch.float32 or _fused_convolution_runs(dtype)


@functools.cache
def _fused_convolution_runs(dtype: torch.dtype) -> bool:
    one = torch.ones(1, 1, 1, 1, dtype=dtype)
    try:
        torch.ops.mkldnn._convolution_pointwise(one, one, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
    except RuntimeError:
        return False
    return True


class FusedConv2d(nn.Module):
    """``activation(conv(x) [+ other])`` in one oneDNN call, with weights stored in ``dtype``.

    Inputs are cast to ``dtype`` (as autocast would cast a convolution's inputs); the output is in ``dtype``.
    """

    def __init__(self, conv: nn.Conv2d, activation: str | None = None, scalars: list[float] | None = None,
                 residual: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d needs numeric zero padding")
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.weight = nn.Parameter(conv.weight.detach().to(dtype), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.activation, self.scalars, self.residual = activation, list(scalars or []), residual

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        x = x.to(self.weight.dtype)
        if self.residual:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other.to(x.dtype), self.weight, self.bias, self.padding, self.stride, self.dilation,
                self.groups, "add", None, self.activation, self.scalars, "")
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, self.activation or "none",
                                                       self.scalars, "")

    def extra_repr(self) -> str:
        sum_ = " + residual" if self.residual else ""
        return (f"{tuple(self.weight.shape)}, stride={tuple(self.stride)}, groups={self.groups}, "
                f"{self.activation or 'identity'}(conv{sum_}), {self.weight.dtype}")


def fuse_conv_activations(model: nn.Module, dtype: torch.dtype = torch.float32, *,
                          copy_model: bool = True) -> nn.Module:
    """A copy of ``model`` (``model`` itself, changed, with ``copy_model=False``) (a TANet, or any module ``torch.fx``
    can trace) in which every ``Conv2d``
    followed by a ReLU/ReLU6, by ``+ residual``, or by ``+ residual`` then ReLU, is one :class:`FusedConv2d`
    (a residual must have the convolution output's shape, as in ResNet and MobileNetV2 blocks).

    For CPU inference with oneDNN; weights of fused convolutions are stored in ``dtype``
    (``torch.bfloat16`` for the bf16 path). Same outputs as ``model`` up to rounding in ``dtype``.
    """
    if not conv_fusion_available(dtype):
        raise RuntimeError(f"fused convolutions in {dtype} need a PyTorch build with oneDNN (mkldnn) and, for "
                           f"bfloat16, a CPU with AVX-512 or AVX-NE-CONVERT")
    fused = (copy.deepcopy(model) if copy_model else model).eval()
    backbones = [name for name in _BACKBONES if _has_submodule(fused, name)]  # a TANet has one or both
    if not backbones:
        return _fuse_graph(fx.symbolic_trace(fused), dtype)
    for name in backbones:
        parent, _, child = name.rpartition(".")
        setattr(fused.get_submodule(parent), child, _fuse_graph(fx.symbolic_trace(fused.get_submodule(name)), dtype))
    return fused


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _activation(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, list[float]] | None:
    if node.op == "call_module":
        return _ACTIVATIONS.get(type(graph_module.get_submodule(node.target)))
    if node.op == "call_function" and node.target in _ACTIVATIONS:
        return _ACTIVATIONS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return _ACTIVATIONS[F.relu]
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_graph(graph_module: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    graph = graph_module.graph
    for node in list(graph.nodes):  # folded BatchNorms are Identity: drop them so a conv meets its activation
        if node.op == "call_module" and type(graph_module.get_submodule(node.target)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for index, node in enumerate(list(graph.nodes)):
        if node.op != "call_module" or type(graph_module.get_submodule(node.target)) is not nn.Conv2d:
            continue
        if (user := _only_user(node)) is None:
            continue
        chain = [user]  # the nodes the fused conv replaces, besides the conv itself
        residual = None
        if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(residual, fx.Node) or residual is node:
                continue
            after = _only_user(user)
            if after is not None and _activation(graph_module, after) == _ACTIVATIONS[nn.ReLU]:
                chain.append(after)  # oneDNN fuses ReLU, and no other activation, after a sum
        activation = _activation(graph_module, chain[-1])
        if residual is None and activation is None:
            continue
        name, scalars = activation or (None, [])
        target = f"fused_conv_{index}"
        graph_module.add_submodule(target, FusedConv2d(graph_module.get_submodule(node.target), name, scalars,
                                                       residual=residual is not None, dtype=dtype))
        with graph.inserting_before(chain[-1]):
            new = graph.call_module(target, (node.args[0],) if residual is None else (node.args[0], residual))
        chain[-1].replace_all_uses_with(new)
        for dead in (*reversed(chain), node):
            graph.erase_node(dead)
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module
