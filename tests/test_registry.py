"""The model registry (models/registry.py): every registered model builds and gives what its config says;
released weights are found in, and fetched into, the user cache; the registry needs no torch; outside
models/ nothing asks a variant's name what to do."""
from __future__ import annotations

import csv
import hashlib
import io
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import option
from helpers.download import DownloadError
from http_helpers import serve_bytes
from models import TANet, create_model, get_pretrained_cfg, list_models, load_tanet, registry
from scoring import Scorer, write_results

REPO = Path(__file__).resolve().parents[1]
VARIANT_TEST = re.compile(r"variant([\"']\])?\s*(==|!=)")  # variant == ..., o["variant"] != ...
QUIET = ["--num_workers", "0", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_gives_what_its_config_says(name, tmp_path):
    torch.manual_seed(0)
    cfg = get_pretrained_cfg(name)
    model = create_model(name).eval()
    assert model.pretrained_cfg == cfg and model.branches == cfg.branches and model.variant == cfg.variant
    with torch.no_grad():
        out = model(torch.randn(2, *cfg.input_shape))
    assert out.shape == (2, cfg.outputs)
    scores = cfg.scores_1_to_10(out)
    assert scores.shape == (2,) and bool(((scores >= 1) & (scores <= 10)).all())
    assert np.allclose(cfg.scores_1_to_10(out.numpy()), scores.numpy(), atol=1e-6)
    # the columns a scoring run writes for it (predict.py writes its files with write_results)
    Image.new("RGB", (64, 48), (120, 80, 40)).save(tmp_path / "a.png")
    results = Scorer.from_model(model, device="cpu").score_detailed([str(tmp_path / "a.png")])
    assert results[0].error is None and 1 <= results[0].score <= 10
    write_results(results, tmp_path / "out.csv", cfg.variant)
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert tuple(header) == cfg.result_columns
    assert cfg.as_dict()["result_columns"] == list(cfg.result_columns)


def test_names_aliases_and_unknown_names():
    assert {"tanet-tad66k", "tanet-ava"} <= set(list_models())
    assert list_models(pretrained=True) == ["tanet-ava", "tanet-tad66k"]
    assert list_models("tanet-ava*") == [n for n in list_models() if n.startswith("tanet-ava")]
    assert get_pretrained_cfg("ava") is get_pretrained_cfg("tanet-ava")
    assert get_pretrained_cfg("tanet-ava").is_distribution and not get_pretrained_cfg("tad66k").is_distribution
    with pytest.raises(ValueError, match="unknown model 'nope'.*tanet-ava"):
        get_pretrained_cfg("nope")
    with pytest.raises(ValueError, match="no released weights"):
        create_model("tanet-ava-aesthetics", pretrained=True)


def test_the_registry_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from models import list_models, get_pretrained_cfg\n"
            "assert len(list_models()) >= 2 and get_pretrained_cfg('tanet-ava').as_dict()['outputs'] == 10\n"
            "assert 'models.tanet' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_at_most_two_variant_name_tests_outside_models():
    found = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("models", "tests") or any(p.startswith(".") for p in rel.parts):
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if VARIANT_TEST.search(line)]
    assert len(found) <= 2, found


def _dropouts(model: nn.Module) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}


def test_head_dropout_sets_the_three_heads_only():
    default = _dropouts(TANet("tad66k"))
    assert default == {"tygertnet.drop1": 0.5, "head_rgb.1": 0.75, "mobileNet.head.1": 0.75, "head.1": 0.75}
    model = create_model("tanet-ava", head_dropout=0.2)
    assert _dropouts(model) == {**default, "head_rgb.1": 0.2, "mobileNet.head.1": 0.2, "head.1": 0.2}
    assert model.pretrained_cfg.head_dropout == 0.2 and get_pretrained_cfg("tanet-ava").head_dropout == 0.75
    with pytest.raises(ValueError, match="head_dropout"):
        TANet("tad66k", head_dropout=1.0)


def test_head_dropout_option_and_checkpoint(tmp_path):
    assert option.apply_dataset_defaults(option.init(["--dataset", "tad66k"])).head_dropout == 0.75  # the reference
    assert option.apply_dataset_defaults(option.init(["--dataset", "demo"])).head_dropout == 0.1  # its recipe
    args = option.check_options(option.apply_dataset_defaults(option.init(["--dataset", "demo", "--head_dropout",
                                                                           "0.3"])))
    assert args.head_dropout == 0.3
    with pytest.raises(ValueError, match="--head_dropout"):
        option.check_options(option.apply_dataset_defaults(option.init(["--dataset", "demo", "--head_dropout", "1"])))
    # a checkpoint reloads with the network it was trained with
    model = create_model("tanet-tad66k-aesthetics", head_dropout=0.3)
    torch.save({"model": model.state_dict(), "variant": "tad66k", "options": {"head_dropout": 0.3}},
               tmp_path / "run.pth")
    loaded, _ = load_tanet(tmp_path / "run.pth")
    assert set(_dropouts(loaded).values()) == {0.3}
    assert set(_dropouts(load_tanet(tmp_path / "run.pth", head_dropout=0.0)[0]).values()) == {0.0}


def test_main_nni_builds_its_model_with_head_dropout():
    import main_nni

    args = option.check_options(option.apply_dataset_defaults(option.init(
        ["--dataset", "demo", "--head_dropout", "0.3", "--branches", "aesthetics"])))
    model = main_nni.build_model(args, torch.device("cpu"), None)
    assert _dropouts(model) == {"mobileNet.head.1": 0.3, "head.1": 0.3}


# --------------------------------------------------------------------------- released weights

@pytest.fixture
def released(monkeypatch, tmp_path):
    """A registered model ``tanet-test`` (APNet alone: small) whose released file a local server gives;
    the user cache is ``tmp_path/cache``. Yields (state_dict, the file's bytes, the WeightFile)."""
    torch.manual_seed(1)
    state = create_model("tanet-tad66k-aesthetics").state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    requests: list[str] = []
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with serve_bytes(payload, requests) as url:
        entry = registry.WeightFile("tanet_test.pth", "tanet", "tad66k", f"{url}/t.pth")
        monkeypatch.setitem(registry.WEIGHT_FILES, entry.name, entry)
        cfg = replace(get_pretrained_cfg("tanet-tad66k-aesthetics"), name="tanet-test", weight_file=entry.name)
        monkeypatch.setitem(registry._REGISTRY, cfg.name, cfg)
        monkeypatch.setenv("TANET_CHECKPOINTS", str(tmp_path / "cache"))
        yield state, payload, entry, requests


def test_pretrained_fetches_the_released_file_into_the_user_cache(released, tmp_path):
    state, payload, entry, requests = released
    model = create_model("tanet-test", pretrained=True)
    assert (tmp_path / "cache" / entry.name).read_bytes() == payload and len(requests) == 1
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    scorer = Scorer("tanet-test", device="cpu", fast=False)  # found in the cache now: no second fetch
    assert scorer.checkpoint == tmp_path / "cache" / entry.name and len(requests) == 1
    assert not (REPO / "checkpoints" / entry.name).exists()


def test_without_the_file_and_without_pretrained_one_line_says_how(released, tmp_path, capsys):
    _, _, entry, requests = released
    with pytest.raises(FileNotFoundError) as err:
        Scorer("tanet-test", device="cpu")
    message = str(err.value)
    assert "\n" not in message and entry.name in message and str(tmp_path / "cache") in message
    assert "--pretrained" in message and not requests
    import predict

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert predict.main([str(tmp_path / "a.png"), "--model", "tanet-test", *QUIET]) == 2
    assert "--pretrained" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "a.png"), "--model", "tanet-test", "--pretrained", *QUIET]) == 0
    assert (tmp_path / "cache" / entry.name).is_file() and len(requests) == 1


def test_a_pinned_sha256_is_checked(released, monkeypatch, tmp_path):
    _, payload, entry, _ = released
    monkeypatch.setitem(registry.WEIGHT_FILES, entry.name, replace(entry, sha256="0" * 64))
    with pytest.raises(DownloadError, match="checksum"):
        create_model("tanet-test", pretrained=True)
    assert not (tmp_path / "cache" / entry.name).exists()
    monkeypatch.setitem(registry.WEIGHT_FILES, entry.name, replace(entry, sha256=hashlib.sha256(payload).hexdigest()))
    assert get_pretrained_cfg("tanet-test").sha256 == hashlib.sha256(payload).hexdigest()
    create_model("tanet-test", pretrained=True)
    assert (tmp_path / "cache" / entry.name).read_bytes() == payload


def test_without_the_environment_the_cache_is_torch_hubs(monkeypatch, tmp_path):
    from models import user_cache_dir

    monkeypatch.delenv("TANET_CHECKPOINTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert user_cache_dir() == tmp_path / "hub" / "checkpoints"


def test_export_takes_a_model_name(released, tmp_path, capsys):
    pytest.importorskip("onnx", reason="the export needs onnx (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="the export needs onnxruntime (pip install -r requirements-deploy.txt)")
    from importlib import util

    spec = util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit):  # neither a checkpoint nor --model
        tool.main(["--out", str(tmp_path / "t.onnx")])
    assert tool.main(["--model", "tanet-test", "--out", str(tmp_path / "t.onnx")]) == 1
    assert "--pretrained" in capsys.readouterr().err
    assert tool.main(["--model", "tanet-test", "--pretrained", "--out", str(tmp_path / "t.onnx")]) == 0
    assert (tmp_path / "t.onnx").is_file() and (tmp_path / "cache" / released[2].name).is_file()


def test_predict_and_serve_take_model_and_pretrained():
    import predict

    args = predict.build_parser().parse_args(["photos", "--model", "tanet-ava", "--pretrained"])
    assert args.path_to_model_weight == "tanet-ava" and args.download
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -r requirements-deploy.txt")
    import serve

    args = serve.build_parser().parse_args(["--model", "tanet-tad66k"])
    assert args.path_to_model_weight == "tanet-tad66k" and not args.download
