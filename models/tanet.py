"""TANet (Figure 5 of the paper): theme, RGB-attention and aesthetics branches, fused by one head."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .aesthetics import AESTHETICS_FEATURES, AestheticsBranch
from .rgb_attention import PATCH_GRID, RGB_FEATURES, rgb_attention_head, rgb_similarity
from .registry import get_pretrained_cfg, list_variants
from .theme import THEME_FEATURES, HyperNet, TargetNet, places365_resnet18, pool_theme

FUSED_FEATURES = AESTHETICS_FEATURES + THEME_FEATURES + RGB_FEATURES  # 30
THEME_FUSION_MODES = ("batch", "isolated")
BRANCHES = ("aesthetics", "theme", "rgb")
_THEME_KEYS = ("x_theme", "theme_logits", "theme_hidden", "theme_matrix")  # APNet, TUNet, RGBNet: the full TANet
_BRANCH_FEATURES = {"aesthetics": AESTHETICS_FEATURES, "theme": THEME_FEATURES, "rgb": RGB_FEATURES}
# The TANet variants (the ``variant`` of a checkpoint): those of the registered models.
VARIANTS: tuple[str, ...] = tuple(list_variants())


def check_branches(branches: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The branches of a TANet in their canonical order; ValueError unless they are known, distinct
    and include "aesthetics" (APNet, which every variant of the paper's ablation keeps)."""
    names = branches.split(",") if isinstance(branches, str) else list(branches)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in BRANCHES]
    if unknown or len(set(names)) != len(names) or "aesthetics" not in names:
        raise ValueError(f"branches must be distinct names among {', '.join(BRANCHES)} including aesthetics, "
                         f"got {','.join(names) or 'none'}")
    return tuple(b for b in BRANCHES if b in names)


def fusion_head(outputs: int, features: int = FUSED_FEATURES, dropout: float = 0.75) -> nn.Sequential:
    """``head`` ("L6"): ReLU, Dropout(0.75), Linear(30, k), then Sigmoid (k = 1) or Softmax (k = 10);
    with fewer branches, Linear(10 per branch, k)."""
    return nn.Sequential(
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(features, outputs),
        nn.Sigmoid() if outputs == 1 else nn.Softmax(dim=1),
    )


class TANet(nn.Module):
    """Theme-aware aesthetics network.

    ``variant="tad66k"`` returns a (B, 1) score in [0, 1]; ``variant="ava"`` a (B, 10)
    distribution over the scores 1..10. Input: (B, 3, 224, 224), ImageNet-normalised.
    ``theme_fusion="batch"`` is the reference (an image's theme feature depends on its
    batch-mates); ``"isolated"`` scores every image as if it were alone in its batch.
    ``branches`` picks the branches of the paper's ablation (Table 5): any of "aesthetics", "theme",
    "rgb" that includes "aesthetics"; a branch left out is neither built nor run, and the fusion head
    takes 10 features per branch. ``theme_network=False`` builds the theme branch without the
    Places365 ResNet and its heads, for isolated scoring only (where they cannot change the result).
    ``head_dropout`` is the dropout before the Linear of the fusion, aesthetics and RGB heads (the
    reference's 0.75). The variant's outputs and theme normalisation come from its registry entry
    (``models.registry``).
    """

    def __init__(self, variant: str = "tad66k", theme_fusion: str = "batch", branches: tuple[str, ...] = BRANCHES,
                 theme_network: bool = True, head_dropout: float = 0.75) -> None:
        super().__init__()
        if variant not in list_variants():
            raise ValueError(f"unknown TANet variant {variant!r}; expected one of {list_variants()}")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
        self.variant = variant
        self.spec = get_pretrained_cfg(variant)
        self.head_dropout = float(head_dropout)
        self.branches = check_branches(branches)
        self.has_theme_network = "theme" in self.branches and bool(theme_network)
        self.theme_fusion = theme_fusion  # validated by the setter
        self._warned_lone_ava = False

        # The attribute names are the reference's: they are the checkpoint format.
        # Theme understanding (TUNet)
        if self.has_theme_network:
            self.res365_last = places365_resnet18()
            self.hypernet = HyperNet()
            self.tygertnet = TargetNet()
            self.avg = nn.AdaptiveAvgPool2d((THEME_FEATURES, 1))
        # RGB-distribution attention (RGBNet)
        if "rgb" in self.branches:
            self.avg_RGB = nn.AdaptiveAvgPool2d((PATCH_GRID, PATCH_GRID))
        # Aesthetics perceiving (APNet)
        self.mobileNet = AestheticsBranch(head_dropout)
        self.softmax = nn.Softmax(dim=1)  # unused, kept from the reference
        if "rgb" in self.branches:
            self.head_rgb = rgb_attention_head(head_dropout)
        # Fusion
        self.head = fusion_head(self.spec.outputs, sum(_BRANCH_FEATURES[b] for b in self.branches), head_dropout)

    # Readable aliases (properties, so the state_dict keeps the reference keys only).
    @property
    def theme_backbone(self) -> nn.Module:
        return self.res365_last

    @property
    def aesthetics_branch(self) -> AestheticsBranch:
        return self.mobileNet

    @property
    def theme_fusion(self) -> str:
        return self._theme_fusion

    @theme_fusion.setter
    def theme_fusion(self, mode: str) -> None:
        if mode not in THEME_FUSION_MODES:
            raise ValueError(f"unknown theme_fusion {mode!r}; expected one of {THEME_FUSION_MODES}")
        if mode == "batch" and "theme" in self.branches and not self.has_theme_network:
            raise ValueError("this TANet was built without its theme network (theme_network=False): it scores "
                             "with theme_fusion='isolated' only")
        self._theme_fusion = mode

    def freeze_theme_backbone(self) -> None:
        """Freeze the Places365 ResNet's parameters, as the reference does for training (if it is built).

        Its BatchNorm running statistics still update in train mode (the reference
        calls ``model.train()`` on the whole model).
        """
        if self.has_theme_network:
            self.res365_last.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_branches(x)["output"]

    def forward_branches(self, x: Tensor) -> dict[str, Tensor | None]:
        """All intermediate features: ``x_aes``, ``x_theme``, ``x_rgb`` (each (B, 10)),
        ``rgb_similarity`` (B, 144, 144), ``theme_logits`` (B, 365), ``theme_hidden``
        (B, 100) and ``theme_matrix`` (B, B) (these three None when the theme ResNet is
        skipped), and ``output``; the features of a branch left out are None."""
        similarity = x_rgb = None
        if "rgb" in self.branches:
            similarity = rgb_similarity(self.avg_RGB(x))
            x_rgb = self.head_rgb(similarity.flatten(1))
        theme = self._theme_branch(x) if "theme" in self.branches else dict.fromkeys(_THEME_KEYS)
        x_aes = self.mobileNet(x)
        fused = [f for f in (x_aes, theme["x_theme"], x_rgb) if f is not None]
        output = self.fuse(fused)
        return {"x_aes": x_aes, "x_rgb": x_rgb, "rgb_similarity": similarity, **theme, "output": output}

    def fuse(self, features: list[Tensor]) -> Tensor:
        """The fusion head on the branches' features, always in at least float32: under autocast the
        last layer's bf16 rounding would tie different photos' scores and leave a distribution summing
        to 1 only within 5e-4. In float32 (the reference) this is exactly ``head(cat(features))``."""
        wide = [f.to(torch.promote_types(f.dtype, torch.float32)) for f in features]
        with torch.autocast(wide[0].device.type, enabled=False):
            return self.head(torch.cat(wide, dim=1))

    def _theme_branch(self, x: Tensor) -> dict[str, Tensor | None]:
        batch = x.shape[0]
        lone_ava = batch == 1 and self.spec.theme_normalise == "batchnorm"
        if self.theme_fusion == "isolated" or lone_ava or not self.has_theme_network:
            if lone_ava and self.theme_fusion == "batch" and not self._warned_lone_ava:
                warnings.warn(
                    "TANet(variant='ava') got a batch of one image: the reference crashes here; "
                    "using the isolated theme value (zeros) instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_lone_ava = True
            # A lone image's theme matrix is 1x1; after normalisation it is a constant,
            # whatever the theme ResNet says, so the ResNet is not run at all.
            x_theme = x.new_full((batch, THEME_FEATURES), self.spec.isolated_theme_value)
            return {"x_theme": x_theme, "theme_logits": None, "theme_hidden": None, "theme_matrix": None}

        # The frozen ResNet needs no autograd; its BatchNorm statistics still update in train mode.
        needs_grad = any(p.requires_grad for p in self.res365_last.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            s = self.res365_last(x)
        w, c = self.hypernet(s)
        h = self.tygertnet.hidden(s)
        q = self.tygertnet(h, w, c, self.spec.theme_normalise)
        return {"x_theme": pool_theme(q, self.avg), "theme_logits": s, "theme_hidden": h, "theme_matrix": q}
