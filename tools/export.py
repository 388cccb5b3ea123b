"""Export a trained TANet to ONNX, for running it without this code (onnxruntime, other runtimes).

    python tools/export.py runs/demo-20261130-120000/best.pth --out tanet.onnx
    python tools/export.py SRCC_513_LCC_531_MSE_016.pth --download --out tanet_tad66k.onnx

The file holds the isolated model (batch-independent scores), a dynamic batch axis, the outputs
``output`` (the model's own: score / 10, or the 10-bin distribution) and ``score`` (1..10), and the
preprocessing contract in its metadata. The file is written only when onnxruntime's outputs agree with
PyTorch's on a random batch (within 1e-4, finite); else the exit status is 1 and no file is left. Score
with it: ``python predict.py photos/ --path_to_model_weight tanet.onnx`` (needs only
requirements-score.txt). Exporting needs the optional extra: pip install -r requirements-deploy.txt.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/export.py`
    sys.path.insert(0, str(REPO_DIR))

import option  # noqa: E402
from helpers.console import one_line  # noqa: E402
from helpers.download import DownloadError  # noqa: E402
from scoring.onnx_export import ExportError, export_onnx  # noqa: E402
from models import resolve_weights  # noqa: E402
from helpers.safe_io import json_text  # noqa: E402

PROG = "tools/export.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a TANet checkpoint to ONNX (isolated theme fusion, "
                                "dynamic batch, preprocessing in the metadata).")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a TANet checkpoint: ours (runs/<name>/best.pth) or a released one (a path or its file name, "
                        "looked up in --checkpoints_dir); or pass --model NAME")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    option.add_checkpoint_options(p, weight_option=False)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        parser.error("name the checkpoint to export: a checkpoint argument or --model NAME (one of them)")
    try:
        checkpoint = resolve_weights(args.checkpoint or args.model, directory=args.checkpoints_dir,
                                     download_missing=args.download)
        info, diff = export_onnx(checkpoint, args.out, variant=args.variant, allow_unsafe=args.allow_unsafe_load)
    except (ExportError, ValueError, FileNotFoundError, DownloadError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"{args.out}: {info['tanet.variant']} TANet ({info['tanet.branches']}), isolated theme fusion, dynamic "
          f"batch; onnxruntime against PyTorch on a random batch: max |difference| {diff:.1e}")
    print(json_text(json.loads(info["tanet.preprocessing"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
