"""The DA-KPN translation function: per-pixel HSV affine colour, Gaussian blur and fixed noise.

Every operation is pointwise or a normalised local average of the pixel's own neighbourhood, so no
pixel ever moves: a translated image stays aligned with its source label by construction. All
images here are in [0, 1] (the package converts from dasslab's [-1, 1] at its boundary).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PARAM_NAMES = (
    "gain_h", "gain_s", "gain_v",
    "offset_h", "offset_s", "offset_v",
    "sigma_r", "sigma_g", "sigma_b",
    "noise_r", "noise_g", "noise_b",
)
NUM_PARAMS = len(PARAM_NAMES)
# raw parameter values that make the translation the identity (see spatial_gaussian_blur for sigma 0)
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# colour space
# --------------------------------------------------------------------------------------------------
def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] to HSV in [0,1] (hue as a fraction of the circle); differentiable a.e."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_hsv expects (B,3,H,W), got {tuple(rgb.shape)}")
    r, g, b = rgb.unbind(1)
    maxc, argmax = rgb.max(1)
    minc = rgb.min(1).values
    delta = maxc - minc
    safe = delta.clamp_min(_EPS)
    h = torch.where(argmax == 0, (g - b) / safe,
                    torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > _EPS, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    s = torch.where(maxc > _EPS, delta / maxc.clamp_min(_EPS), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: f(n) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    if hsv.dim() != 4 or hsv.shape[1] != 3:
        raise ValueError(f"hsv_to_rgb expects (B,3,H,W), got {tuple(hsv.shape)}")
    h, s, v = hsv.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * ramp


def hsv_affine(rgb: torch.Tensor, gains: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """hsv' = gains * hsv + offsets per pixel; hue wraps around the circle, s and v are clamped."""
    hsv = rgb_to_hsv(rgb) * gains + offsets
    h = torch.remainder(hsv[:, :1], 1.0)
    sv = hsv[:, 1:].clamp(0.0, 1.0)
    return hsv_to_rgb(torch.cat([h, sv], 1))


# --------------------------------------------------------------------------------------------------
# spatially varying blur
# --------------------------------------------------------------------------------------------------
def _sq_dist(kernel_size: int, device, dtype) -> torch.Tensor:
    r = kernel_size // 2
    ax = torch.arange(-r, r + 1, device=device, dtype=dtype)
    return (ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2).reshape(-1)  # (K*K,), row-major like unfold


def spatial_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 7,
                          sigma_min: float = 0.5, sigma_max: float | None = None,
                          max_elements: int = 2 ** 26) -> torch.Tensor:
    """Blur each pixel and channel of ``x`` with its own normalised KxK Gaussian (replicate padding).

    ``sigma`` (B,C,H,W) is the raw sigma map. For sigma >= ``sigma_min`` the kernel is the sampled
    Gaussian of that std; below it the kernel is the line through the identity and the
    ``sigma_min`` Gaussian, K = delta + (sigma / sigma_min) (G_min - delta). So sigma 0 is *exactly*
    the identity (the official code starts at sigma 1, a near-identity at 720p but a visible blur at
    32x64), the gradient at the identity is not zero (a sampled Gaussian with sigma -> 0 has a
    vanishing gradient), and slightly negative sigma continues the line into mild unsharp masking
    (clamped at -sigma_min): the identity term's minimum then sits on a smooth point, not a kink.

    Vectorised with ``unfold``; rows are processed in blocks so that at most ``max_elements``
    neighbourhood values exist at once (the 25x25 paper kernel at 512x1024 needs this).
    """
    if x.shape != sigma.shape:
        raise ValueError(f"sigma map shape {tuple(sigma.shape)} must equal the image shape {tuple(x.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    if sigma_min <= 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    if kernel_size == 1:
        return x
    B, C, H, W = x.shape
    r = kernel_size // 2
    kk = kernel_size * kernel_size
    s = sigma.clamp(-sigma_min, sigma_max if sigma_max is not None else float(kernel_size) / 2)
    amount = (s / sigma_min).clamp(max=1.0)
    s_g = s.clamp(min=sigma_min)
    d2 = _sq_dist(kernel_size, x.device, x.dtype).view(1, 1, kk, 1, 1)
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    rows = max(1, min(H, max_elements // max(1, B * C * kk * W)))
    out = []
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        patches = F.unfold(xp[:, :, y0:y1 + 2 * r], kernel_size).view(B, C, kk, y1 - y0, W)
        logw = -d2 / (2.0 * s_g[:, :, None, y0:y1] ** 2)
        w = torch.softmax(logw, dim=2)  # normalised kernel, numerically safe for small sigma
        out.append((w * patches).sum(2))
    blurred = torch.cat(out, 2) if len(out) > 1 else out[0]
    return x + amount * (blurred - x)


# --------------------------------------------------------------------------------------------------
# the full translation
# --------------------------------------------------------------------------------------------------
def apply_translation(x01: torch.Tensor, params: torch.Tensor, noise: torch.Tensor, kernel_size: int = 7,
                      sigma_min: float = 0.5, sigma_max: float | None = None) -> torch.Tensor:
    """Applies the 12 per-pixel parameters (B,12,H,W) to an image in [0,1], in the paper's order.

    (1) HSV affine colour transform, (2) spatially varying Gaussian blur, (3) a per-pixel,
    per-channel scale on the fixed noise map ``noise`` (broadcast over the batch), clamp to [0,1].
    """
    if params.shape[1] != NUM_PARAMS or params.shape[-2:] != x01.shape[-2:] or params.shape[0] != x01.shape[0]:
        raise ValueError(f"params must be (B,{NUM_PARAMS},H,W) matching the image {tuple(x01.shape)}, "
                         f"got {tuple(params.shape)}")
    gains, offsets, sigma, scale = params.split(3, dim=1)
    y = hsv_affine(x01, gains, offsets)
    y = spatial_gaussian_blur(y, sigma, kernel_size, sigma_min, sigma_max)
    y = y + scale * noise
    return y.clamp(0.0, 1.0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Identity forward, gradient times -lam backward: one backward pass trains D and, reversed, the KPN."""
    return _GradReverse.apply(x, lam)


def fixed_noise(size: tuple[int, int], seed: int, channels: int = 3) -> torch.Tensor:
    """The stored N(0,1) noise map (1,C,H,W), from its own generator (independent of the global RNG)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, channels, int(size[0]), int(size[1]), generator=g)
