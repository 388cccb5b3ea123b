"""The report's RGB-attention figure of one image, for the web page (``webapp``): the one name it needs of
the report."""
from __future__ import annotations

import math

import torch

from models import TANet

from .figures import ScoredImage, png_bytes, rgb_attention_figure
from .passes import rgb_attention_inputs


def rgb_attention_png(model: TANet, image: torch.Tensor, name: str, score: float | None,
                      device: torch.device) -> bytes:
    """The RGB-attention figure (PNG) of one normalised (3, 224, 224) image: its input, 12x12 patch colours
    and their similarity, titled with ``name`` and its predicted ``score`` (None: not scored)."""
    inputs, patches, similarity = rgb_attention_inputs(model, [{"image": image}], [0], device)
    shown = math.nan if score is None else score
    return png_bytes(rgb_attention_figure([ScoredImage(name, math.nan, shown)], inputs, patches, similarity))
