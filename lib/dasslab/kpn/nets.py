"""Networks: the kernel predictor, the DA-KPN translator around a frozen segmenter, PatchGAN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dasslab.kpn import ops


class KernelPredictor(nn.Module):
    """Class logits (B,C,h,w) -> 12 raw translation parameters per low-res pixel.

    ``hidden=0`` is the official form: one 1x1 convolution. ``hidden>0`` adds a 3x3 convolution
    with ``hidden`` channels and a ReLU before it (the deeper option). Either way the last layer
    starts with zero weights and the identity biases, so the initial translation is the identity.
    """

    def __init__(self, num_classes: int = 19, hidden: int = 0):
        super().__init__()
        if num_classes < 1 or hidden < 0:
            raise ValueError(f"KernelPredictor: num_classes must be >= 1 and hidden >= 0, got {num_classes}, {hidden}")
        self.num_classes, self.hidden = num_classes, hidden
        self.body = (nn.Sequential(nn.Conv2d(num_classes, hidden, 3, padding=1, padding_mode="replicate"),
                                   nn.ReLU(inplace=True)) if hidden else nn.Identity())
        self.head = nn.Conv2d(hidden or num_classes, ops.NUM_PARAMS, 1)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        self.head.weight.zero_()
        self.head.bias.copy_(torch.tensor(ops.IDENTITY))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"KernelPredictor expects (B,{self.num_classes},h,w) logits, got {tuple(logits.shape)}")
        return self.head(self.body(logits))


class DAKPN(nn.Module):
    """Frozen segmenter on a low-res copy -> kernel predictor -> upsampled parameters -> translation.

    Images in and out are dasslab's [-1, 1]. The segmenter is a frozen submodule (kept in eval mode
    whatever ``train()`` says, so its BatchNorm statistics never move); only ``predictor`` learns.
    ``noise`` is the fixed N(0,1) map, a buffer drawn from ``noise_seed`` at ``image_size``.
    """

    def __init__(self, segmenter: nn.Module, image_size, lowres, num_classes: int = 19, hidden: int = 0,
                 kernel_size: int = 7, sigma_min: float = 0.5, sigma_max: float | None = None,
                 noise_seed: int = 0):
        super().__init__()
        self.image_size = tuple(int(v) for v in image_size)
        self.lowres = tuple(int(v) for v in lowres)
        if len(self.image_size) != 2 or len(self.lowres) != 2 or min(self.lowres) < 1:
            raise ValueError(f"DAKPN: image_size and lowres must be (H, W), got {image_size}, {lowres}")
        self.kernel_size, self.sigma_min, self.sigma_max = int(kernel_size), float(sigma_min), sigma_max
        self.segmenter = segmenter
        for p in self.segmenter.parameters():
            p.requires_grad_(False)
        self.segmenter.eval()
        self.predictor = KernelPredictor(num_classes, hidden)
        self.register_buffer("noise", ops.fixed_noise(self.image_size, noise_seed))
        self.config = {"image_size": list(self.image_size), "lowres": list(self.lowres),
                       "num_classes": num_classes, "hidden": hidden, "kernel_size": self.kernel_size,
                       "sigma_min": self.sigma_min, "sigma_max": sigma_max, "noise_seed": int(noise_seed)}

    def train(self, mode: bool = True):
        super().train(mode)
        self.segmenter.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """What a checkpoint needs: the predictor and the noise map (the segmenter is cached elsewhere)."""
        sd = {f"predictor.{k}": v for k, v in self.predictor.state_dict().items()}
        sd["noise"] = self.noise
        return sd

    def load_trainable_state_dict(self, sd: dict) -> None:
        self.predictor.load_state_dict({k[len("predictor."):]: v for k, v in sd.items() if k.startswith("predictor.")})
        self.noise.copy_(sd["noise"].to(self.noise))

    def _noise_for(self, hw) -> torch.Tensor:
        if tuple(hw) == self.image_size:
            return self.noise
        # other sizes: tile the stored map (deterministic, still fixed across calls)
        reps = (-(-hw[0] // self.image_size[0]), -(-hw[1] // self.image_size[1]))
        return self.noise.repeat(1, 1, *reps)[..., : hw[0], : hw[1]]

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen segmenter's logits on the low-res copy of ``x`` (no gradient)."""
        low = F.interpolate(x, size=self.lowres, mode="bilinear", align_corners=False, antialias=True)
        return self.segmenter(low).float()

    def lowres_params(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictor(self.logits(x) if logits is None else logits)

    def params(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Full-resolution raw parameters (B,12,H,W): the low-res prediction, bilinearly upsampled."""
        p = self.lowres_params(x, logits)
        return F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DAKPN expects (B,3,H,W) images in [-1,1], got {tuple(x.shape)}")
        p = self.params(x, logits)
        y = ops.apply_translation((x + 1) / 2, p, self._noise_for(x.shape[-2:]), self.kernel_size,
                                  self.sigma_min, self.sigma_max)
        return y * 2 - 1

    @torch.no_grad()
    def parameter_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 12 predicted full-res raw maps {name: (B,H,W)} for plotting (sigma < 0: mild sharpening)."""
        p = self.params(x).cpu()
        return {name: p[:, i] for i, name in enumerate(ops.PARAM_NAMES)}


class PatchGAN(nn.Module):
    """pix2pix / CycleGAN ``NLayerDiscriminator``: 4x4 convolutions, LeakyReLU 0.2, a logit per patch.

    ``norm`` is ``"batch"`` (DA-KPN's discriminator) or ``"instance"`` (CycleGAN's).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "instance"):
            raise ValueError(f"PatchGAN norm must be 'batch' or 'instance', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"PatchGAN n_layers must be >= 1, got {n_layers}")
        Norm = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.InstanceNorm2d(c, affine=False))
        bias = norm == "instance"
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), Norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """Smallest input side that still gives one logit: n stride-2 and two stride-1 4x4 convs."""
        return 3 * 2 ** self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
