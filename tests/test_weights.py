"""Loading the reference weight files, the registry and the optimiser groups."""
from __future__ import annotations


import pytest
import torch

from http_helpers import serve_bytes
from reliability_helpers import MarkerPayload
from models import registry
from models import (
    PARAM_GROUPS,
    TANet,
    checkpoints_dir,
    infer_variant,
    load_mobilenet_v2,
    load_places365_resnet18,
    load_tanet,
    parameter_groups,
    read_tanet_checkpoint,
    resolve_weights,
)
from models.registry import WEIGHT_FILES
from helpers.safe_io import CheckpointError, UnsafeCheckpointError, sha256_file

RELEASED = {v: registry.get_pretrained_cfg(v).weight_file for v in ("tad66k", "ava")}  # the released weight files


@pytest.fixture(scope="module")
def donor() -> dict[str, TANet]:
    torch.manual_seed(3)
    return {"tad66k": TANet("tad66k"), "ava": TANet("ava")}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_places365_file_loads_into_theme_branch(tmp_path, donor):
    path = tmp_path / "resnet18_places365.pth.tar"
    state = {f"module.{k}": v for k, v in donor["tad66k"].res365_last.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "best_prec1": 54.7}, path)
    model = TANet("tad66k")
    load_places365_resnet18(model, path)
    assert _same(model.res365_last, donor["tad66k"].res365_last)


def test_mobilenet_file_loads_features_and_ignores_classifier(tmp_path, donor):
    path = tmp_path / "mobilenetv2.pth.tar"
    state = {f"features.{k}": v for k, v in donor["ava"].mobileNet.base_model[0].state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(1000, 1280)
    state["classifier.1.bias"] = torch.zeros(1000)
    torch.save(state, path)
    model = TANet("ava")
    load_mobilenet_v2(model, path)
    assert _same(model.mobileNet.base_model[0], donor["ava"].mobileNet.base_model[0])


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
@pytest.mark.slow
def test_released_plain_state_dict_and_our_checkpoint_load(tmp_path, donor, variant):
    plain = tmp_path / RELEASED[variant]
    torch.save(donor[variant].state_dict(), plain)
    ours = tmp_path / "best.pth"
    torch.save({"model": donor[variant].state_dict(), "variant": variant, "epoch": 4}, ours)
    for path in (plain, ours):
        for asked in (None, variant):
            model, meta = load_tanet(path, variant=asked, theme_fusion="isolated")
            assert meta["variant"] == variant and model.variant == variant and model.theme_fusion == "isolated"
            assert _same(model, donor[variant])
    assert read_tanet_checkpoint(ours)[1]["epoch"] == 4


def test_wrong_variant_names_the_keys_and_the_cause(tmp_path, donor):
    path = tmp_path / "ava.pth"
    torch.save(donor["ava"].state_dict(), path)
    with pytest.raises(CheckpointError, match=r"ava.pth is a 'ava' model, but variant 'tad66k' was asked for"):
        load_tanet(path, variant="tad66k")
    state = {k: v for k, v in donor["ava"].state_dict().items() if k != "head.2.weight"}
    torch.save(state, path)  # no fusion head: the variant cannot be told, and the keys do not fit
    with pytest.raises(CheckpointError, match="cannot be told"):
        load_tanet(path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: head\.2\.weight"):
        load_tanet(path, variant="ava")


def test_backbone_file_given_as_tanet_checkpoint_is_explained(tmp_path, donor):
    path = tmp_path / "resnet.pth"
    torch.save(donor["tad66k"].res365_last.state_dict(), path)
    with pytest.raises(CheckpointError, match="missing.*not look like a TANet checkpoint"):
        load_tanet(path, variant="tad66k")
    with pytest.raises(CheckpointError, match="MobileNetV2"):
        load_mobilenet_v2(TANet("tad66k"), path)


def test_pickle_payload_is_refused_and_never_runs(tmp_path, donor):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(donor["tad66k"].state_dict())
    torch.save({"state_dict": state, "x": MarkerPayload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="--allow_unsafe_load"):
        load_tanet(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken"])
def test_broken_weight_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_tanet(path, variant="tad66k")


def test_infer_variant():
    assert infer_variant({"head.2.weight": torch.zeros(1, 30)}) == "tad66k"
    assert infer_variant({"head.2.weight": torch.zeros(10, 30)}) == "ava"
    assert infer_variant({}) is None


def test_registry_knows_the_four_reference_files():
    assert set(WEIGHT_FILES) == {
        "resnet18_places365.pth.tar", "mobilenetv2.pth.tar", "SRCC_513_LCC_531_MSE_016.pth", "SRCC_758_LCC_765.pth",
    }
    assert RELEASED == {"tad66k": "SRCC_513_LCC_531_MSE_016.pth", "ava": "SRCC_758_LCC_765.pth"}
    assert all(w.url.startswith("http") for w in WEIGHT_FILES.values())


def test_checkpoints_folder_option_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TANET_CHECKPOINTS", raising=False)
    assert checkpoints_dir().name == "checkpoints"
    monkeypatch.setenv("TANET_CHECKPOINTS", str(tmp_path / "env"))
    assert checkpoints_dir() == tmp_path / "env"
    assert checkpoints_dir(tmp_path / "opt") == tmp_path / "opt"


def test_resolve_weights_finds_paths_and_registry_names(tmp_path, monkeypatch):
    monkeypatch.setenv("TANET_CHECKPOINTS", str(tmp_path))
    (tmp_path / "mobilenetv2.pth.tar").write_bytes(b"x")
    assert resolve_weights("mobilenetv2.pth.tar") == tmp_path / "mobilenetv2.pth.tar"
    assert resolve_weights(tmp_path / "mobilenetv2.pth.tar") == tmp_path / "mobilenetv2.pth.tar"
    with pytest.raises(FileNotFoundError, match="SRCC_758_LCC_765.pth.*--download"):
        resolve_weights("SRCC_758_LCC_765.pth")
    with pytest.raises(FileNotFoundError, match="registry names"):
        resolve_weights("nonsense.pth")


def test_resolve_weights_downloads_from_the_registry(tmp_path, monkeypatch):
    payload = b"weights" * 1000
    with serve_bytes(payload) as url:
        entry = registry.WeightFile("mobilenetv2.pth.tar", "mobilenet_v2", None, f"{url}/m")
        monkeypatch.setitem(registry.WEIGHT_FILES, entry.name, entry)
        path = resolve_weights("mobilenetv2.pth.tar", directory=tmp_path, download_missing=True, progress=False)
    assert path == tmp_path / "mobilenetv2.pth.tar" and path.read_bytes() == payload
    assert len(sha256_file(path)) == 64


def test_parameter_groups_cover_every_parameter_with_its_rate():
    model = TANet("tad66k")
    lrs = {name: 10.0 ** -(i + 1) for i, name in enumerate(PARAM_GROUPS)}
    groups = parameter_groups(model, lrs)
    assert [g["name"] for g in groups] == list(PARAM_GROUPS)
    assert [g["lr"] for g in groups] == [lrs[n] for n in PARAM_GROUPS]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.Adam(groups)  # accepted as is
    with pytest.raises(ValueError, match="hypernet"):
        parameter_groups(model, {k: v for k, v in lrs.items() if k != "hypernet"})
