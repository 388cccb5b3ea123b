"""Scores that do not depend on the CPU: float32 scoring by default, a float32 fusion head and score
under any autocast, and the TANET_CPU_BF16 switch that shows one kind of CPU what the other would do."""
from __future__ import annotations

import pytest
import torch

import predict
import serve
from models import TANet
from helpers.runtime import BF16_SWITCH, cpu_bf16_instructions, cpu_has_native_bf16, describe_hardware, resolve_amp
from scoring import Scorer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_the_fusion_head_and_its_output_run_in_float32_under_bf16(variant, inputs):
    torch.manual_seed(0)
    model = TANet(variant).eval()
    x = (inputs - 0.45) / 0.226
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_branches(x)
    assert out["x_aes"].dtype == torch.bfloat16  # the branches ran in bf16
    assert out["output"].dtype == torch.float32
    if variant == "ava":
        assert (out["output"].sum(dim=1) - 1).abs().max().item() < 1e-6
    # float32 resolution: different images never tie (bf16 has 8 bits of mantissa)
    assert len({tuple(row) for row in out["output"].tolist()}) == len(x)


def test_the_fusion_head_keeps_float64_and_float32_exact():
    torch.manual_seed(0)
    model = TANet("tad66k", theme_fusion="isolated", theme_network=False).eval()
    feats = [torch.randn(3, 10), torch.randn(3, 10), torch.randn(3, 10)]
    with torch.no_grad():
        assert torch.equal(model.fuse(feats), model.head(torch.cat(feats, dim=1)))
        assert model.double().fuse([f.double() for f in feats]).dtype == torch.float64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "ava.pth"
    torch.manual_seed(1)
    torch.save(TANet("ava").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(3)
    paths = []
    for i in range(5):
        pixels = (torch.rand(48 + 8 * i, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"p{i}.png")
        paths.append(str(root / f"p{i}.png"))
    return paths


def test_scoring_defaults_to_float32_where_the_cpu_has_bf16(checkpoint, photos, monkeypatch):
    monkeypatch.setenv(BF16_SWITCH, "1")  # as on a Sapphire Rapids or a Zen 4
    assert resolve_amp("auto", CPU) == "bf16"
    assert Scorer(checkpoint, device="cpu").amp == "none"
    for parser in (predict.build_parser(), serve.build_parser()):
        assert parser.get_default("amp") == "none"


@pytest.mark.slow  # a minute of emulated bf16 on a CPU without bfloat16 instructions
def test_bf16_scores_keep_float32_resolution(checkpoint, photos):
    results = Scorer(checkpoint, device="cpu", amp="bf16").score_detailed(photos)
    assert all(abs(sum(r.distribution) - 1) < 1e-6 for r in results)
    assert len({r.score for r in results}) == len(photos)  # no ties from bf16 rounding
    plain = Scorer(checkpoint, device="cpu").score_detailed(photos)
    assert all(abs(sum(r.distribution) - 1) < 1e-6 for r in plain)


def test_the_bf16_switch(monkeypatch):
    monkeypatch.setenv(BF16_SWITCH, "1")
    assert cpu_has_native_bf16() and resolve_amp("auto", CPU) == "bf16"
    monkeypatch.setenv(BF16_SWITCH, "0")
    assert not cpu_has_native_bf16() and resolve_amp("auto", CPU) == "none"
    monkeypatch.setenv(BF16_SWITCH, "yes")
    with pytest.raises(ValueError, match=BF16_SWITCH):
        cpu_has_native_bf16()
    monkeypatch.delenv(BF16_SWITCH)
    assert cpu_has_native_bf16() == cpu_bf16_instructions()


def test_a_run_records_the_hardware(monkeypatch):
    monkeypatch.setenv(BF16_SWITCH, "1")
    info = describe_hardware(CPU)
    assert info["cpu"] and info["cpu_cores"] >= 1 and info[BF16_SWITCH] == "1"
    assert info["cpu_bf16_instructions"] == cpu_bf16_instructions() and "gpu" not in info
