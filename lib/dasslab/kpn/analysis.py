"""What the notebook shows about the translators, computed here (and tested) rather than in cells.

- :func:`influence_map`: which input pixels an output pixel depends on, |d y(p) / d x| summed over
  channels. For a KPN it is confined to the blur kernel around p; for a convolutional generator it
  spans the receptive field (dozens of pixels across class borders).
- :func:`parameters_by_class`: the mean predicted parameter per ground-truth class. The official
  KPN is a 1x1 convolution on class logits, so it learns, in effect, one colour / blur / noise
  setting per class, blended where the segmenter is unsure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dasslab.kpn import ops


def influence_map(fn, image: torch.Tensor, pixel: tuple[int, int]) -> torch.Tensor:
    """|d sum_c fn(x)[c, y, x] / d x| summed over input channels: an (H, W) map for one output pixel.

    ``fn`` maps (1,3,H,W) images in [-1,1] to the same shape; ``image`` is (3,H,W). Parameters the
    function predicts without gradient (the KPN's frozen segmenter path) count as fixed: the map
    shows where the output pixel's *content* comes from.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"influence_map: image must be (3,H,W), got {tuple(image.shape)}")
    H, W = image.shape[-2:]
    yy, xx = int(pixel[0]), int(pixel[1])
    if not (0 <= yy < H and 0 <= xx < W):
        raise ValueError(f"influence_map: pixel {pixel} outside the {H}x{W} image")
    x = image[None].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        out[0, :, yy, xx].sum().backward()
    return x.grad[0].abs().sum(0).detach()


def influence_radius(infl: torch.Tensor, pixel: tuple[int, int], rel: float = 1e-3) -> float:
    """Largest Chebyshev distance from ``pixel`` at which the influence exceeds ``rel`` x its maximum."""
    thr = float(infl.max()) * rel
    ys, xs = torch.nonzero(infl > thr, as_tuple=True)
    if len(ys) == 0:
        return 0.0
    return float(torch.maximum((ys - pixel[0]).abs(), (xs - pixel[1]).abs()).max())


@torch.no_grad()
def parameters_by_class(model, dataset, n: int | None = None, batch_size: int = 16,
                        class_names=None) -> pd.DataFrame:
    """Mean full-res predicted parameter per ground-truth class over the first ``n`` items.

    Rows: classes present (by name), columns: the 12 parameter names plus ``pixels``.
    """
    if class_names is None:
        from dasslab import labels

        class_names = labels.CLASS_NAMES
    n = len(dataset) if n is None else min(n, len(dataset))
    if n == 0:
        raise ValueError("parameters_by_class: empty dataset")
    C = len(class_names)
    sums = np.zeros((C, ops.NUM_PARAMS))
    counts = np.zeros(C)
    dev = next(model.predictor.parameters()).device
    for b0 in range(0, n, batch_size):
        items = [dataset[i] for i in range(b0, min(n, b0 + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(dev)
        lab = torch.stack([it["label"] for it in items]).reshape(-1)
        p = model.params(x).permute(0, 2, 3, 1).reshape(-1, ops.NUM_PARAMS).double().cpu()
        ok = lab < C
        lab, p = lab[ok], p[ok]
        sums += torch.zeros(C, ops.NUM_PARAMS, dtype=torch.float64).index_add_(0, lab, p).numpy()
        counts += np.bincount(lab.numpy(), minlength=C)
    keep = counts > 0
    df = pd.DataFrame(sums[keep] / counts[keep, None], columns=list(ops.PARAM_NAMES),
                      index=pd.Index([class_names[i] for i in np.flatnonzero(keep)], name="class"))
    df["pixels"] = counts[keep].astype(np.int64)
    return df


GROUPS = {"colour": slice(0, 6), "blur": slice(6, 9), "noise": slice(9, 12)}


@torch.no_grad()
def translate_with(model, images: torch.Tensor, keep=("colour", "blur", "noise"), batch_size: int = 64) -> torch.Tensor:
    """The model's translation with only the operation groups in ``keep`` switched on (the others at
    their identity values): which part buys the target look, and which part costs the label."""
    bad = sorted(set(keep) - set(GROUPS))
    if bad:
        raise ValueError(f"translate_with: unknown group(s) {bad}; groups: {list(GROUPS)}")
    dev = next(model.predictor.parameters()).device
    ident = torch.tensor(ops.IDENTITY, device=dev).view(1, -1, 1, 1)
    out = []
    for b0 in range(0, len(images), batch_size):
        x = images[b0:b0 + batch_size].to(dev)
        p = model.params(x)
        for name, sl in GROUPS.items():
            if name not in keep:
                p[:, sl] = ident[:, sl]
        out.append((ops.apply_translation((x + 1) / 2, p, model._noise_for(x.shape[-2:]), model.kernel_size,
                                          model.sigma_min, model.sigma_max) * 2 - 1).cpu())
    return torch.cat(out)
