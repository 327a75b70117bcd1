"""Segmentation networks chosen by name.

Every model maps (B,3,H,W) images in [-1,1] to logits (B,C,H,W) at input resolution and exposes
``forward_features(x)``: the last-stage backbone feature map (ZoDi's z). Nothing is downloaded:
timm / transformers backbones start from random init unless ``pretrained_path`` names a local file.

- ``unet-small``: a small U-Net for CPU profiles (BatchNorm, ~0.1-1M parameters depending on ``width``).
- ``deeplabv2-r101``: ResNet-101 (timm), output stride 8 by dilation, DeepLab-V2 ASPP classifier
  (sum of four 3x3 convolutions, dilations 6/12/18/24), as used by the GTA5 -> Cityscapes literature.
- ``deeplabv3plus-r50`` / ``deeplabv3plus-r101``: ResNet (timm), output stride 16, ASPP with image
  pooling and the V3+ decoder on stride-4 features (ZoDi's segmenter).
- ``segformer-b0`` .. ``segformer-b5``: MiT encoder + all-MLP decoder. timm has no MiT models, so
  these use ``transformers``' SegFormer implementation with the published b0..b5 sizes (random init,
  or ``pretrained_path`` = a local ``save_pretrained`` folder or a state-dict file).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _up(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if logits.shape[-2:] == x.shape[-2:]:
        return logits
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _load_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _load_backbone(backbone: nn.Module, path) -> None:
    """Loads ImageNet-style weights into a timm features_only backbone; classifier keys are ignored."""
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in _load_state(path).items()}
    own = backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        missing = sorted(set(own) - set(usable))[:5]
        raise ValueError(
            f"pretrained_path {path} matches only {len(usable)}/{len(own)} backbone tensors "
            f"(first missing: {missing})"
        )
    backbone.load_state_dict(usable, strict=False)


# --------------------------------------------------------------------------------------------------
# unet-small
# --------------------------------------------------------------------------------------------------
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetSmall(nn.Module):
    """U-Net with ``depth`` downsamplings; channel widths ``width * 2**level``."""

    def __init__(self, num_classes: int = 19, width: int = 16, depth: int = 3):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.stem = _block(3, chans[0])
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(_block(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.depth = depth

    def _encode(self, x):
        skips = [self.stem(x)]
        for blk in self.down:
            skips.append(blk(F.max_pool2d(skips[-1], 2)))
        return skips

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        skips = self._encode(x)
        h = skips[-1]
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            h = dec(torch.cat([up(h), skip], 1))
        return self.head(h)[..., :H, :W]


# --------------------------------------------------------------------------------------------------
# DeepLab family (timm ResNets)
# --------------------------------------------------------------------------------------------------
def _timm_resnet(name: str, out_indices, output_stride: int, pretrained_path):
    import timm

    bb = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=out_indices, output_stride=output_stride
    )
    if pretrained_path:
        _load_backbone(bb, pretrained_path)
    return bb


class ASPPv2(nn.Module):
    """DeepLab-V2 classifier: the sum of parallel dilated 3x3 convolutions straight to class scores."""

    def __init__(self, cin: int, num_classes: int, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(cin, num_classes, 3, padding=d, dilation=d) for d in dilations
        )
        for b in self.branches:
            nn.init.normal_(b.weight, 0, 0.01)
            nn.init.zeros_(b.bias)

    def forward(self, x):
        return sum(b(x) for b in self.branches)


class DeepLabV2(nn.Module):
    def __init__(self, num_classes: int = 19, backbone: str = "resnet101", pretrained_path=None):
        super().__init__()
        self.backbone = _timm_resnet(backbone, (4,), 8, pretrained_path)
        self.classifier = ASPPv2(self.backbone.feature_info.channels()[-1], num_classes)

    def forward_features(self, x):
        return self.backbone(x)[-1]

    def forward(self, x):
        return _up(self.classifier(self.forward_features(x)), x)


def _cbr(cin, cout, k=1, d=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=(k // 2) * d, dilation=d, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPPv3(nn.Module):
    def __init__(self, cin: int, cout: int = 256, dilations=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout)] + [_cbr(cin, cout, 3, d) for d in dilations])
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(_cbr(cout * (len(dilations) + 2), cout), nn.Dropout(0.1))

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int = 19, backbone: str = "resnet50", pretrained_path=None):
        super().__init__()
        self.backbone = _timm_resnet(backbone, (1, 4), 16, pretrained_path)
        low_c, high_c = self.backbone.feature_info.channels()
        self.aspp = ASPPv3(high_c)
        self.low = _cbr(low_c, 48)
        self.decoder = nn.Sequential(_cbr(256 + 48, 256, 3), _cbr(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward_features(self, x):
        return self.backbone(x)[-1]

    def forward(self, x):
        low, high = self.backbone(x)
        h = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        h = self.decoder(torch.cat([h, self.low(low)], 1))
        return _up(self.classifier(h), x)


# --------------------------------------------------------------------------------------------------
# SegFormer (transformers implementation; timm has no MiT)
# --------------------------------------------------------------------------------------------------
_MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}


class SegFormer(nn.Module):
    def __init__(self, num_classes: int = 19, variant: str = "b0", pretrained_path=None):
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        if pretrained_path and Path(pretrained_path).is_dir():
            self.net = SegformerForSemanticSegmentation.from_pretrained(
                str(pretrained_path),
                num_labels=num_classes,
                ignore_mismatched_sizes=True,
                local_files_only=True,
            )
            return
        hidden, depths, dec = _MIT[variant]
        cfg = SegformerConfig(
            hidden_sizes=hidden,
            depths=depths,
            decoder_hidden_size=dec,
            num_labels=num_classes,
            semantic_loss_ignore_index=255,
        )
        self.net = SegformerForSemanticSegmentation(cfg)
        if pretrained_path:
            sd = _load_state(pretrained_path)
            own = self.net.state_dict()
            usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
            if not any(k.startswith("segformer.") for k in usable):
                raise ValueError(f"pretrained_path {pretrained_path} holds no SegFormer encoder weights")
            self.net.load_state_dict(usable, strict=False)

    def forward_features(self, x):
        return self.net.segformer(pixel_values=x).last_hidden_state

    def forward(self, x):
        return _up(self.net(pixel_values=x).logits, x)


# --------------------------------------------------------------------------------------------------
def _names() -> list[str]:
    return ["unet-small", "deeplabv2-r101", "deeplabv3plus-r50", "deeplabv3plus-r101"] + [
        f"segformer-{v}" for v in _MIT
    ]


MODEL_NAMES = _names()


def build_segmenter(
    name: str = "unet-small", num_classes: int = 19, pretrained_path=None, **kwargs
) -> nn.Module:
    """A segmenter by name (see the module docstring). ``kwargs`` go to the model (e.g. ``width``).

    The returned module carries ``seg_config`` (name, num_classes, kwargs) so that
    :func:`dasslab.seg.save_segmenter` can rebuild it.
    """
    if pretrained_path and not Path(pretrained_path).exists():
        raise FileNotFoundError(
            f"pretrained_path {pretrained_path} does not exist (weights are never downloaded)"
        )
    if name == "unet-small":
        if pretrained_path:
            raise ValueError(
                "unet-small has no pretrained weights; load a saved segmenter with load_segmenter"
            )
        model = UNetSmall(num_classes, **kwargs)
    elif name == "deeplabv2-r101":
        model = DeepLabV2(num_classes, "resnet101", pretrained_path, **kwargs)
    elif name in ("deeplabv3plus-r50", "deeplabv3plus-r101"):
        model = DeepLabV3Plus(num_classes, "resnet" + name.rsplit("-r", 1)[1], pretrained_path, **kwargs)
    elif name.startswith("segformer-") and name.split("-", 1)[1] in _MIT:
        model = SegFormer(num_classes, name.split("-", 1)[1], pretrained_path, **kwargs)
    else:
        raise ValueError(f"unknown segmenter {name!r}; known: {MODEL_NAMES}")
    model.seg_config = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)}
    return model
