"""The fast model paths against the plain float32 path: channels-last, bfloat16 / float16 autocast,
the frozen theme ResNet without autograd, torch.compile, and the loader settings."""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from training.engine import make_loader, prepare_images
from golden import golden_input, golden_state_dict
from models import conv_fusion_available, TANet, fold_batchnorm
from path_helpers import (CPU, golden_batches, golden_scores, golden_tanet, needs_bf16_instructions, needs_native_bf16,
                          perturb_batchnorm)
from helpers.runtime import autocast, cpu_has_native_bf16, to_device

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def _train_step(model: TANet, device: torch.device, amp: str = "none", channels_last: bool = False):
    """One train-mode forward and backward, as train_one_epoch does it: output, gradients, buffers."""
    model.train()
    batch = golden_batches()[0]
    x = to_device(batch["image"], device, channels_last)
    torch.manual_seed(11)  # the same dropout masks in every path
    with autocast(device, amp):
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.float(), batch["target"].to(device))
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    return out.detach().float().cpu(), grads, buffers


@functools.lru_cache(maxsize=None)
def _reference() -> tuple:
    """The plain float32 path: evaluation outputs, and a training step's output, gradients and buffers."""
    return (golden_scores(golden_tanet(), CPU), *_train_step(golden_tanet(), CPU))


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.mark.slow
def test_channels_last_matches_fp32_in_eval_and_training():
    ref, out_ref, g_ref, b_ref = _reference()
    fast = golden_scores(golden_tanet(channels_last=True), CPU, channels_last=True)
    assert (fast - ref).abs().max() < 1e-5
    out_cl, g_cl, b_cl = _train_step(golden_tanet(channels_last=True), CPU, channels_last=True)
    assert (out_cl - out_ref).abs().max() < 1e-5
    assert g_cl.keys() == g_ref.keys()
    # Train-mode BatchNorm backward cancels most of its terms, so float32 rounding differences of
    # the convolution algorithms show as about 2% of the (small) MobileNet gradients: compare whole vectors.
    a, b = _flat(g_cl), _flat(g_ref)
    assert _cosine(a, b) > 0.999 and (a - b).norm() / b.norm() < 0.05
    for name in b_ref:
        assert torch.allclose(b_cl[name].float(), b_ref[name].float(), atol=1e-5, rtol=1e-4), name


@needs_native_bf16
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_cpu_autocast_stays_close_to_fp32(channels_last):
    ref, out_ref, g_ref, _ = _reference()
    low = golden_scores(golden_tanet(channels_last=channels_last), CPU, amp="bf16", channels_last=channels_last)
    assert torch.isfinite(low).all() and (low - ref).abs().max() < 0.05
    out_low, g_low, _ = _train_step(golden_tanet(channels_last=channels_last), CPU, amp="bf16",
                                    channels_last=channels_last)
    assert (out_low - out_ref).abs().max() < 0.05
    assert all(torch.isfinite(g).all() for g in g_low.values())
    # The heads' gradients agree; the MobileNet's, after train-mode BatchNorm backward in bfloat16,
    # are mostly rounding (cosine about 0.3-0.4 with float32 at these random weights; see README, Speed).
    for prefix in ("head.", "head_rgb.", "hypernet."):
        names = [n for n in g_ref if n.startswith(prefix)]
        a, b = (torch.cat([g[n].flatten() for n in names]) for g in (g_low, g_ref))
        assert _cosine(a, b) > 0.98, prefix


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
@pytest.mark.slow
def test_folded_batchnorm_matches_the_plain_model(variant):
    model = golden_tanet(variant)
    perturb_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20 + 53  # ResNet-18, MobileNetV2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    ref = golden_scores(model, CPU)
    assert (golden_scores(folded, CPU) - ref).abs().max() < 1e-5


@needs_bf16_instructions
@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_folded_batchnorm_in_bfloat16_stays_close(variant):
    model = golden_tanet(variant)
    perturb_batchnorm(model)
    fast = fold_batchnorm(model).to(memory_format=torch.channels_last)
    assert (golden_scores(fast, CPU, amp="bf16", channels_last=True) - golden_scores(model, CPU)).abs().max() < 0.05


@pytest.mark.slow
def test_frozen_theme_resnet_without_autograd_is_exact():
    frozen = golden_tanet(frozen=True).train()
    assert not frozen.forward_branches(golden_input(2))["theme_logits"].requires_grad  # no graph through the ResNet
    _, out_f, g_f, b_f = _reference()
    out_a, g_a, b_a = _train_step(golden_tanet(frozen=False), CPU)
    assert torch.equal(out_f, out_a)
    assert {n for n in g_a if not n.startswith("res365_last.")} == set(g_f)
    assert any(n.startswith("res365_last.") for n in g_a)  # the other path did run autograd through it
    for name in g_f:
        assert torch.equal(g_f[name], g_a[name]), name
    for name in b_f:  # the ResNet's BatchNorm statistics move the same way
        assert torch.equal(b_f[name], b_a[name]), name


def test_uint8_batches_give_the_same_input_in_every_memory_format():
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    plain = prepare_images(images, CPU, train=False, channels_last=False)
    fast = prepare_images(images, CPU, train=False, channels_last=True)
    assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, fast)
    assert plain.dtype == torch.float32 and plain.is_contiguous()


def test_loader_settings():
    data = list(range(10))
    loader = make_loader(data, batch_size=4, train=False, num_workers=0, device=CPU)
    assert not loader.pin_memory and [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = make_loader(data, batch_size=4, train=True, num_workers=2, device=torch.device("cuda", 0))
    assert loader.pin_memory and loader.num_workers == 2 and loader.prefetch_factor >= 2


@pytest.mark.skipif(CUDA is None, reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_autocast_stays_close_to_fp32(amp):
    ref = golden_scores(golden_tanet(device=CUDA), CUDA)
    low = golden_scores(golden_tanet(device=CUDA, channels_last=True), CUDA, amp=amp, channels_last=True)
    assert torch.isfinite(low).all() and (low - ref).abs().max() < 0.05
    from training.engine import train_one_epoch
    model = golden_tanet(device=CUDA, channels_last=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    loss = train_one_epoch(model, golden_batches() * 2, optimizer, torch.nn.MSELoss(), CUDA, amp=amp, scaler=scaler,
                           channels_last=True, progress=False)
    assert loss == loss and loss < 1.0


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_model_matches_eager():
    """About a minute on 2 cores with an empty inductor cache."""
    compiled = torch.compile(golden_tanet())
    ref = _reference()[0]
    assert (golden_scores(compiled, CPU) - ref).abs().max() < 1e-4
    # The benchmark's compile+freeze+channels_last path (inductor's weight freezing, inference only), in
    # bf16 on CPUs that have it.
    amp = "bf16" if cpu_has_native_bf16() else "none"
    bench = _benchmark_tool()
    path = bench.parse_path("compile+freeze+channels_last" + ("+bf16" if amp == "bf16" else ""), CPU, train=False)
    _, frozen = bench.build_model(path, CPU, golden_state_dict("tad66k"))
    with bench.inductor_freezing(True):
        fast = golden_scores(frozen, CPU, amp=amp, channels_last=True)
    assert torch.isfinite(fast).all() and (fast - ref).abs().max() < (0.05 if amp == "bf16" else 1e-4)


# --- tools/benchmark.py -------------------------------------------------------------------------

def _benchmark_tool():
    name = "tanet_benchmark_tool"
    if name not in sys.modules:  # registered first: its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "benchmark.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_benchmark_path_names():
    bench = _benchmark_tool()
    assert bench.parse_path("fp32", CPU, train=True) == bench.ModelPath("fp32")
    assert bench.parse_path("reference", CPU, train=True).reference_loop
    p = bench.parse_path("compile+bf16+channels_last", CPU, train=True)
    assert (p.compile, p.amp, p.channels_last, p.isolated) == (True, "bf16", True, False)
    assert bench.parse_path("isolated+bf16", CPU, train=False).isolated
    assert bench.parse_path("foldbn+bf16+channels_last", CPU, train=False).fold_bn
    assert bench.parse_path("foldbn+fuse+channels_last", CPU, train=False).fuse
    if conv_fusion_available(torch.bfloat16):
        assert bench.parse_path("foldbn+fuse+bf16+channels_last", CPU, train=False).fuse
    else:
        with pytest.raises(ValueError, match="no AVX-512"):
            bench.parse_path("foldbn+fuse+bf16+channels_last", CPU, train=False)
    onnx = bench.parse_path("onnx", CPU, train=False)
    assert onnx.onnx and onnx.isolated
    with pytest.raises(ValueError, match="CPU evaluation path"):
        bench.parse_path("onnx", CPU, train=True)
    low = "bf16+" if cpu_has_native_bf16() else ""
    fuse = "fuse+" if conv_fusion_available(torch.bfloat16 if low else torch.float32) else ""
    assert f"isolated+foldbn+{fuse}{low}channels_last" in bench.cpu_paths(train=False)
    for name in bench.cpu_paths(train=False):  # every default path runs on this CPU, whatever TANET_CPU_BF16 says
        bench.parse_path(name, CPU, train=False)
    assert ("bf16+channels_last" in bench.cpu_paths(train=True)) == cpu_has_native_bf16()
    with pytest.raises(ValueError, match="CPU evaluation path, with foldbn"):
        bench.parse_path("foldbn+fuse+fp16", torch.device("cuda"), train=False)
    for name, train, message in (("fp16", True, "needs CUDA"), ("bf16+fp16", True, "one of"),
                                 ("isolated", True, "evaluation path"), ("freeze+bf16", False, "with compile"),
                                 ("fp32+bf16", True, "unknown"), ("reference+bf16", True, "unknown"),
                                 ("bf16+bf16", False, "repeated"),
                                 ("foldbn+bf16", True, "folded BatchNorm cannot train"),
                                 ("fuse+bf16", False, "with foldbn")):
        with pytest.raises(ValueError, match=message):
            bench.parse_path(name, CPU, train=train)


@pytest.mark.slow
def test_benchmark_reference_loop_computes_what_the_fp32_path_computes():
    """The benchmark's ``reference`` path (the reference script's loop body) takes the same training step."""
    bench = _benchmark_tool()
    runners = {}
    for name in ("fp32", "reference"):
        runners[name] = bench.Runner(bench.parse_path(name, CPU, train=True), train=True, batch_size=2, device=CPU)
        torch.manual_seed(3)  # the same dropout masks
        runners[name].step()
    before = bench.build_model(bench.ModelPath("fp32"), CPU)[0].state_dict()
    a, b = (r.model.state_dict() for r in runners.values())
    assert any(not torch.equal(before[k], a[k]) for k in a)  # the step changed the weights
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.mark.slow
def test_benchmark_writes_the_report(tmp_path, capsys):
    bench = _benchmark_tool()
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--batch_size", "2", "--steps", "1", "--warmup", "0", "--paths", "fp32", "reference",
            "--eval_paths", "fp32", "reference", "isolated", "isolated+foldbn+fuse", "--data_images", "2",
            "--image_size", "300", "200",
            "--data_seconds", "0.01", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["train"]) == {"fp32"}  # every key names options; the reference loop is reported apart
    assert set(report["eval"]) == {"fp32", "isolated", "isolated+foldbn+fuse"}
    assert set(report["reference"]) == {"train", "eval"} and min(report["reference"].values()) > 0
    if report["allocator"] == "tuned":  # the reference path runs with the allocator the reference script had
        for kind in ("train", "eval"):
            assert report["details"][kind]["reference"]["process"] == "child, system allocator"
    assert all(v > 0 for v in [*report["train"].values(), *report["eval"].values()])
    assert set(report["data"]) == {"uncached", "cached"} and min(report["data"].values()) > 0
    assert isinstance(report["machine"], str) and report["machine"]
    assert "isolated" in capsys.readouterr().out
    assert bench.main(["--paths", "fp16", "--device", "cpu"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")),
                    reason="the onnx path needs requirements-deploy.txt")
def test_benchmark_onnx_path_scores_like_the_isolated_model():
    """The benchmark's onnx path exports the same weights as the other paths (a whole checkpoint)."""
    bench = _benchmark_tool()
    state = golden_state_dict("tad66k")
    isolated = bench.build_model(bench.parse_path("isolated", CPU, train=False), CPU, state)[1].eval()
    _, onnx = bench.build_model(bench.parse_path("onnx", CPU, train=False), CPU, state)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (torch.as_tensor(onnx(x)) - isolated(x)).abs().max() < 1e-3
