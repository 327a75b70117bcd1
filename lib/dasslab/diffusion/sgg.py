"""Semantic Gradient Guidance (SGG, Peng et al., ICCV 2023): SDEdit steered by the source label.

SDEdit noises a source image to step K and lets the target DDPM denoise it: deep K gives the target
look but loses the layout. SGG adds, at every reverse step k, the gradient of a segmentation loss
between a guiding segmenter g and the *source label* y to the model's mean (classifier guidance,
Dhariwal & Nichol 2021), so the sample keeps the label's layout while it takes the target look:

- LCG (local class-regional guidance): for each class c of y (mask m_c),
  ``x_{k-1,c} ~ N(mu - lambda_l Sigma grad CE(g(x_k * m_c), y on m_c), Sigma)`` and the class results
  merge as ``x_{k-1} = sum_c m_c x_{k-1,c}``. With one shared noise draw the merge is the mean shifted
  by ``sum_c m_c grad_c``; every (image, class) pair goes through g as one batch of masked copies, a
  single forward and backward pass.
- GSG (global scene-harmonious guidance): ``x_{k-1} ~ N(mu - lambda_g Sigma grad CE(g(x_k), y), Sigma)``.
- The schedule alternates them step by step (``"alternate"``: LCG on even steps, GSG on odd), or
  uses one of them (``"lcg"``, ``"gsg"``), both at every step (``"both"``), or none (SDEdit).

The guide needs useful gradients on noisy samples. Two inputs are offered: ``guide_input="noisy"``
applies a noise-aware guide (trained on source images noised at random timesteps,
:class:`NoisyCE`) to x_k itself; ``guide_input="x0"`` applies a guide trained on clean source images
to the model's clean estimate x0_hat(x_k). In the x0 mode the gradient reaches x_k through a scalar
Jacobian d x0_hat / d x_k (:func:`x0_jacobian`: ``"identity"`` = 1 / sqrt(abar_k) with the noise
estimate held fixed, ``"gaussian"`` = the posterior-mean Jacobian of a Gaussian image prior, which
vanishes at high noise as the true one does) or through the UNet itself (``x0_grad="unet"``, exact for
GSG; for LCG the merged class cotangent is pulled back in one pass, which mixes neighbouring classes'
pulls, and the cost grows by a UNet backward per step). The scalar forms keep the per-class merge exact.

The sampler is the one reverse loop of :mod:`dasslab.diffusion.sampling`; SGG is only a guidance
hook over it, so a guidance scale of 0 reproduces SDEdit bit for bit (same seed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dasslab import runs
from dasslab.diffusion import sampling

NOTEBOOK = "02_semantic_gradient_guidance"
IGNORE_INDEX = 255
SCHEDULES = ("alternate", "lcg", "gsg", "both", "none")
GUIDE_INPUTS = ("noisy", "x0")
X0_GRADS = ("identity", "gaussian", "unet")
SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------
@dataclass
class SGGConfig:
    """One SGG translation setting (everything that changes the output images)."""

    strength: float = 0.6  # K / T: the depth the source is diffused to
    lambda_lcg: float = 1.0  # LCG scale lambda_l
    lambda_gsg: float = 1.0  # GSG scale lambda_g
    schedule: str = "alternate"  # alternate | lcg | gsg | both | none
    guide_input: str = "x0"  # noisy (noise-aware g on x_k) | x0 (g on x0_hat(x_k))
    x0_grad: str = "identity"  # x0 mode: identity | gaussian | unet (how the gradient reaches x_k)
    x0_prior_var: float = 0.25  # x0_grad="gaussian": per-pixel variance of images in [-1, 1]
    grad_clip: float | None = None  # clamp the guidance gradient to [-c, c] per element (off: None)
    grad_blur: float = 0.0  # Gaussian low-pass of the guidance gradient, sigma in pixels (0: off)
    class_weighting: bool = False  # every class of an image pulls with the same total weight
    sampler: str = "ddpm"  # ddpm (ancestral) | ddim
    num_steps: int | None = None  # steps over the FULL chain (as SDEdit); None = every step
    eta: float = 0.0  # DDIM eta

    def __post_init__(self):
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"SGGConfig.strength={self.strength} must lie in (0, 1]")
        for name, val, ok in (
            ("schedule", self.schedule, SCHEDULES),
            ("guide_input", self.guide_input, GUIDE_INPUTS),
            ("x0_grad", self.x0_grad, X0_GRADS),
            ("sampler", self.sampler, SAMPLERS),
        ):
            if val not in ok:
                raise ValueError(f"SGGConfig.{name}={val!r}; valid: {', '.join(ok)}")
        if self.lambda_lcg < 0 or self.lambda_gsg < 0:
            raise ValueError(
                f"SGGConfig: guidance scales must be >= 0, got lambda_lcg={self.lambda_lcg}, "
                f"lambda_gsg={self.lambda_gsg}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"SGGConfig.grad_clip={self.grad_clip} must be > 0 (or None for no clipping)")
        if self.grad_blur < 0:
            raise ValueError(f"SGGConfig.grad_blur={self.grad_blur} must be >= 0 (0 = off)")
        if self.x0_prior_var <= 0:
            raise ValueError(f"SGGConfig.x0_prior_var={self.x0_prior_var} must be > 0")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"SGGConfig.num_steps={self.num_steps} must be >= 1 (or None)")
        if self.sampler == "ddpm" and self.eta:
            raise ValueError("SGGConfig.eta applies to sampler='ddim' only")
        self.strength = float(self.strength)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **kw) -> SGGConfig:
        return dataclasses.replace(self, **kw)

    @property
    def guided(self) -> bool:
        return self.schedule != "none" and (self.lambda_lcg > 0 or self.lambda_gsg > 0)


def config_from_table(table: dict, **overrides) -> SGGConfig:
    """An SGGConfig from a profile table (keys it does not know are skipped) and overrides."""
    kw = {k: v for k, v in dict(table).items() if k in SGGConfig.fields()}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("grad_clip", "num_steps"):  # TOML has no None: 0 means off / every step
        if kw.get(k) == 0:
            kw[k] = None
    return SGGConfig(**kw)


def scheduler_for(scheduler, sampler: str):
    return sampling.as_ddim(scheduler) if sampler == "ddim" else sampling.as_ddpm(scheduler)


def step_kind(schedule: str, index: int) -> str:
    """Which guidance acts at reverse step ``index``: "lcg", "gsg", "both" or "none"."""
    if schedule == "alternate":
        return "lcg" if index % 2 == 0 else "gsg"
    return schedule


def x0_jacobian(alpha_bar: torch.Tensor, kind: str = "identity", prior_var: float = 0.25) -> torch.Tensor:
    """d x0_hat / d x_k as a scalar, without backpropagating through the UNet.

    ``identity``: the noise estimate held fixed, 1 / sqrt(abar). It is right at low noise and wrong at
    high noise, where the model's x0_hat barely depends on x_k, so it inflates the pull there by up to
    1 / sqrt(abar). ``gaussian``: the Jacobian of the posterior mean E[x0 | x_k] for a Gaussian prior of
    per-pixel variance v (Tweedie): sqrt(abar) v / (abar v + 1 - abar); equal to 1 at abar = 1, vanishing
    as abar -> 0, as the true Jacobian does.
    """
    a = alpha_bar
    if kind == "identity":
        return 1.0 / a.sqrt()
    if kind == "gaussian":
        return a.sqrt() * prior_var / (a * prior_var + 1 - a)
    raise ValueError(f"x0_jacobian kind={kind!r}; valid: identity, gaussian (unet backpropagates instead)")


# --------------------------------------------------------------------------------------------------
# class masks and the two losses
# --------------------------------------------------------------------------------------------------
def class_pairs(labels: torch.Tensor, num_classes: int = 19):
    """The (image, class) pairs present in ``labels`` (B,H,W): ``(b_idx, c_idx, masks)`` with masks
    (N,H,W) float, one per pair, disjoint within an image (ignored pixels belong to none)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B,H,W), got shape {tuple(labels.shape)}")
    lab = labels.long()
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"labels hold ids outside 0..{num_classes - 1} (and {IGNORE_INDEX} = ignore): "
            f"{sorted(set(lab[bad].tolist()))[:5]}"
        )
    onehot = F.one_hot(torch.where(lab == IGNORE_INDEX, num_classes, lab), num_classes + 1)[..., :num_classes]
    present = onehot.flatten(1, 2).any(1)  # (B, C)
    b_idx, c_idx = present.nonzero(as_tuple=True)
    masks = onehot.permute(0, 3, 1, 2)[b_idx, c_idx].to(torch.float32)  # (N, H, W)
    return b_idx, c_idx, masks


def pixel_weights(labels: torch.Tensor, num_classes: int = 19) -> torch.Tensor:
    """Class weighting: pixel weights (B,H,W) that give every class present in an image the same total
    weight, scaled so an image's weights sum to its number of labelled pixels (the unweighted total)."""
    lab = labels.long()
    valid = lab != IGNORE_INDEX
    idx = torch.where(valid, lab, num_classes).flatten(1)
    counts = torch.zeros(lab.shape[0], num_classes + 1, device=lab.device).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float32)
    )[:, :num_classes]
    n_present = (counts > 0).sum(1).clamp(min=1).float()
    n_valid = valid.flatten(1).sum(1).float()
    per_class = torch.where(
        counts > 0, (n_valid / n_present)[:, None] / counts.clamp(min=1), torch.zeros_like(counts)
    )
    per_class = torch.cat([per_class, torch.zeros_like(per_class[:, :1])], 1)
    return per_class.gather(1, idx).view_as(lab) * valid


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no parameter gradients for the duration (restored after)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")


def gsg_loss(
    guide, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image summed pixel CE of g(x) against the label (B,): the GSG loss."""
    ce = _pixel_ce(guide(x), labels.long())
    if weights is not None:
        ce = ce * weights
    return ce.flatten(1).sum(1)


def lcg_loss(
    guide,
    x: torch.Tensor,
    labels: torch.Tensor,
    pairs=None,
    weights: torch.Tensor | None = None,
    num_classes: int = 19,
):
    """LCG losses: one summed CE per (image, class) pair of g(x_b * m_c) on m_c, all pairs in ONE batch.

    Returns ``(loss_per_pair (N,), x_in (N,3,H,W), pairs)``; ``x_in`` are the masked copies (part of
    the graph from ``x``), so ``autograd.grad(loss.sum(), x_in)`` gives every class's own gradient."""
    b_idx, c_idx, masks = pairs if pairs is not None else class_pairs(labels, num_classes)
    m = masks.to(device=x.device, dtype=x.dtype)
    x_in = x[b_idx] * m[:, None]
    target = torch.where(m > 0, labels.long()[b_idx], torch.full_like(labels.long()[b_idx], IGNORE_INDEX))
    ce = _pixel_ce(guide(x_in), target)
    if weights is not None:
        ce = ce * weights[b_idx]
    return ce.flatten(1).sum(1), x_in, (b_idx, c_idx, masks)


def merge_class_gradients(grad_in: torch.Tensor, pairs, batch: int) -> torch.Tensor:
    """LCG merge: ``sum_c m_c * grad_c`` per image (each pixel takes its own class's gradient)."""
    b_idx, _, masks = pairs
    g = grad_in * masks.to(grad_in)[:, None]
    return torch.zeros((batch, *grad_in.shape[1:]), dtype=g.dtype, device=g.device).index_add_(
        0, b_idx.to(g.device), g
    )


def guidance_gradient(
    guide,
    x: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    pairs=None,
    weights: torch.Tensor | None = None,
    num_classes: int = 19,
    per_class: bool = False,
):
    """Gradient of the ``kind`` ("lcg" | "gsg") loss with respect to ``x`` (B,3,H,W), for figures and
    tests. Returns ``(grad, loss_per_image)``, plus the per-pair gradients (N,3,H,W) and the pairs when
    ``per_class`` (LCG only)."""
    with frozen(guide), torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        if kind == "gsg":
            loss = gsg_loss(guide, xl, labels, weights)
            grad = torch.autograd.grad(loss.sum(), xl)[0]
            return (grad, loss.detach()) + ((None, None) if per_class else ())
        if kind != "lcg":
            raise ValueError(f"kind={kind!r}; valid: lcg, gsg")
        loss, x_in, pairs = lcg_loss(guide, xl, labels, pairs, weights, num_classes)
        g_in = torch.autograd.grad(loss.sum(), x_in)[0]
        g_pairs = g_in * pairs[2].to(g_in)[:, None]
        grad = merge_class_gradients(g_in, pairs, x.shape[0])
        per_img = torch.zeros(x.shape[0], device=loss.device).index_add_(
            0, pairs[0].to(loss.device), loss.detach()
        )
        return (grad, per_img) + ((g_pairs, pairs) if per_class else ())


# --------------------------------------------------------------------------------------------------
# the guidance hook
# --------------------------------------------------------------------------------------------------
def blur_gradient(grad: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass (reflect padding) of a (B,C,H,W) guidance gradient.

    A small guide's input gradient is mostly high-frequency: followed as is, it writes fine
    label-correlated texture that the guide reads but that is absent from real target images, a
    shortcut a segmenter trained on the translations then learns (adversarial drift). Low-passing
    the pull lets guidance change what a region looks like (colour, shading, extent), not plant a
    pattern. Peng et al. do not low-pass; this is an option of ours, chosen by downstream mIoU.
    """
    radius = max(1, int(round(3 * sigma)))
    r = torch.arange(-radius, radius + 1, device=grad.device, dtype=grad.dtype)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    C = grad.shape[1]
    H, W = grad.shape[-2:]
    ph, pw = min(radius, H - 1), min(radius, W - 1)
    kh = k[radius - ph: radius + ph + 1]
    kw = k[radius - pw: radius + pw + 1]
    out = F.pad(grad, (pw, pw, 0, 0), mode="reflect") if pw else grad
    out = F.conv2d(out, (kw / kw.sum()).view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    out = F.pad(out, (0, 0, ph, ph), mode="reflect") if ph else out
    return F.conv2d(out, (kh / kh.sum()).view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


class SGGGuidance:
    """The SGG hook for :func:`dasslab.diffusion.sampling.reverse_diffusion`.

    Holds the guide, the source labels of the batch and the settings; at each step it returns the
    guided mean (``state.shift``: DDPM ``mu - lambda Sigma grad``, DDIM via the noise estimate).
    ``history`` logs per step the guided loss (mean per image) and the gradient's mean magnitude.
    """

    def __init__(self, guide, labels: torch.Tensor, cfg: SGGConfig, num_classes: int = 19):
        self.guide, self.cfg, self.num_classes = guide, cfg, num_classes
        self.labels = labels.long()
        self.pairs = class_pairs(self.labels, num_classes)
        self.weights = pixel_weights(self.labels, num_classes) if cfg.class_weighting else None
        # the loop runs the UNet under grad mode only when the gradient must go through it
        self.needs_grad = cfg.guide_input == "x0" and cfg.x0_grad == "unet"
        self.history: list[dict] = []

    def _to(self, device):
        if self.labels.device != device:
            self.labels = self.labels.to(device)
            b, c, m = self.pairs
            self.pairs = (b.to(device), c.to(device), m.to(device))
            if self.weights is not None:
                self.weights = self.weights.to(device)

    def _grad(self, state, kind: str):
        """(gradient w.r.t. x_k, loss per image) for one guidance kind."""
        cfg = self.cfg
        through_unet = cfg.guide_input == "x0" and cfg.x0_grad == "unet"
        if cfg.guide_input == "noisy":
            x = wrt = state.x_t.detach().requires_grad_(True)
            factor = None
        elif not through_unet:
            x = wrt = state.x0_hat.detach().requires_grad_(True)
            factor = x0_jacobian(state.alpha_bar_t, cfg.x0_grad, cfg.x0_prior_var)
        else:
            x, wrt, factor = state.x0_hat, state.x_t, None
        B = x.shape[0]
        if kind == "gsg":
            loss = gsg_loss(self.guide, x, self.labels, self.weights)
            grad = torch.autograd.grad(loss.sum(), wrt)[0]
        else:
            loss, x_in, _ = lcg_loss(self.guide, x, self.labels, self.pairs, self.weights, self.num_classes)
            if not through_unet:
                grad = merge_class_gradients(torch.autograd.grad(loss.sum(), x_in)[0], self.pairs, B)
            else:  # through the UNet: one pull-back of the merged class cotangents
                g_in = torch.autograd.grad(loss.sum(), x_in, retain_graph=True)[0]
                grad = torch.autograd.grad(x, wrt, merge_class_gradients(g_in, self.pairs, B))[0]
            loss = torch.zeros(B, device=loss.device).index_add_(0, self.pairs[0], loss.detach())
        if factor is not None:
            grad = grad * factor
        return grad.detach(), loss.detach()

    def __call__(self, state):
        cfg = self.cfg
        kind = step_kind(cfg.schedule, state.index)
        if kind == "none" or not cfg.guided:
            return None
        self._to(state.x_t.device)
        kinds = ("lcg", "gsg") if kind == "both" else (kind,)
        scales = {"lcg": cfg.lambda_lcg, "gsg": cfg.lambda_gsg}
        total, rec = None, {"index": state.index, "t": state.t, "kind": kind}
        with frozen(self.guide), torch.enable_grad():
            for k in kinds:
                if scales[k] == 0:
                    continue
                grad, loss = self._grad(state, k)
                if cfg.grad_blur > 0:
                    grad = blur_gradient(grad, cfg.grad_blur)
                if cfg.grad_clip is not None:
                    grad = grad.clamp(-cfg.grad_clip, cfg.grad_clip)
                rec[f"{k}_loss"] = float(loss.mean())
                rec[f"{k}_grad"] = float(grad.abs().mean())
                total = scales[k] * grad if total is None else total + scales[k] * grad
        self.history.append(rec)
        if total is None:
            return None
        return state.shift(total.to(state.mean.dtype), 1.0).detach()


# --------------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------------
def sgg_translate(
    unet,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    guide,
    cfg: SGGConfig,
    generator: sampling.Generator = None,
    num_classes: int = 19,
    return_hook: bool = False,
    progress: bool | str = False,
):
    """Translate a batch of source images (B,3,H,W) in [-1,1] with their labels (B,H,W).

    SDEdit (:func:`dasslab.diffusion.sdedit.sdedit`: diffuse to ``cfg.strength``, then the reverse
    loop, noise from ``generator``) with the SGG hook; ``guide=None`` or no guidance in ``cfg`` is plain
    SDEdit. ``generator``: one torch.Generator or one per image. Returns images (B,3,H,W) on the CPU,
    and the hook (its ``history``) when ``return_hook``.
    """
    from dasslab.diffusion import sdedit

    if (
        images.dim() != 4
        or labels.dim() != 3
        or images.shape[0] != labels.shape[0]
        or images.shape[-2:] != labels.shape[-2:]
    ):
        raise ValueError(
            f"sgg_translate: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "must be (B,3,H,W) and (B,H,W) of the same B, H, W"
        )
    hook = make_hook(guide, labels, cfg, num_classes)
    out = sdedit.sdedit(
        unet,
        scheduler,
        images,
        cfg.strength,
        generator,
        steps=cfg.num_steps,
        sampler=cfg.sampler,
        eta=cfg.eta,
        guidance=hook,
        progress=progress,
    )
    return (out, hook) if return_hook else out


def make_hook(guide, labels: torch.Tensor, cfg: SGGConfig, num_classes: int = 19) -> SGGGuidance | None:
    """The SGG hook for one batch, or None when nothing guides (SDEdit)."""
    if guide is None or not cfg.guided:
        return None
    return SGGGuidance(guide, torch.as_tensor(labels), cfg, num_classes)


def translate_dataset_sgg(
    unet,
    scheduler,
    guide,
    dataset,
    out_dir,
    cfg: SGGConfig,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    method: str = "sgg",
    extra: dict | None = None,
    progress: bool = True,
) -> dict:
    """Translate a labelled source dataset with SGG into ``out_dir``: GTA5 layout with the source labels
    and ``translation.json`` (method, settings, seconds per image), through SDEdit's dataset loop
    (:func:`dasslab.diffusion.sdedit.translate_dataset`: per-image seeds from the name, resumable,
    other settings restart the folder). ``extra`` (e.g. the guide's fingerprint) joins the settings.
    Returns the record."""
    from dasslab.diffusion import sdedit

    out_dir = Path(out_dir)
    if (
        out_dir.is_dir()
        and any(out_dir.iterdir())
        and not any((out_dir / m).is_file() for m in (sdedit.RECORD, sdedit.PARTIAL))
    ):
        raise FileExistsError(
            f"{out_dir} exists and is not a translated set (no {sdedit.RECORD}): refusing to "
            "overwrite it; choose another output folder"
        )
    params = {"sgg": cfg.to_dict(), "guided": bool(guide is not None and cfg.guided), **(extra or {})}
    return sdedit.translate_dataset(
        unet,
        scheduler,
        dataset,
        out_dir,
        cfg.strength,
        batch_size=batch_size,
        seed=seed,
        steps=cfg.num_steps,
        sampler=cfg.sampler,
        eta=cfg.eta,
        method=method,
        make_guidance=lambda batch: make_hook(guide, batch["label"], cfg),
        params=params,
        limit=limit,
        progress=progress,
    )


def _sha(obj) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# in-memory translation of a subset (ablations, sweeps, figures) and its scores
# --------------------------------------------------------------------------------------------------
def _step_means(histories: list[list[dict]]) -> list[dict]:
    """Per reverse step, the mean over batches of each logged number."""
    out = []
    for i in range(max((len(h) for h in histories), default=0)):
        recs = [h[i] for h in histories if len(h) > i]
        row = {k: recs[0][k] for k in ("index", "t", "kind")}
        for k in {k for r in recs for k in r if k.endswith(("_loss", "_grad"))}:
            row[k] = float(np.mean([r[k] for r in recs if k in r]))
        out.append(row)
    return out


def translate_subset(
    unet,
    scheduler,
    dataset,
    guide,
    cfg: SGGConfig,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir=None,
    guide_id: str | None = None,
    progress: bool = False,
) -> dict:
    """SGG (or SDEdit when nothing guides) of the first ``n`` items of ``dataset``, kept in memory.

    Same per-image seeds as the dataset translators (a name gives the same image here and on disk).
    With ``cache_dir`` the result is stored under a key of (settings, seed, names, model, guide) and
    reused. Returns ``{"images" (N,3,H,W) float in [-1,1], "labels" (N,H,W), "names",
    "seconds_per_image", "history"}`` (history: per step the guided loss and gradient size).
    """
    from dasslab.diffusion import sdedit

    n = len(dataset) if not n else min(int(n), len(dataset))
    names = list(getattr(dataset, "names", None) or [dataset[i]["name"] for i in range(n)])[:n]
    guided = guide is not None and cfg.guided
    key = _sha(
        {
            "cfg": cfg.to_dict()
            if guided
            else {**cfg.to_dict(), "lambda_lcg": 0, "lambda_gsg": 0, "schedule": "none"},
            "seed": seed,
            "names": names,
            "model": sdedit.model_fingerprint(unet),
            "guide": (guide_id or _weights_sha(guide)) if guided else None,
        }
    )
    path = Path(cache_dir) / f"{key[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    imgs, labs, hists, seconds = [], [], [], 0.0
    bar = runs.progress(
        total=n, desc="sgg" if guided else "sdedit", leave=False, **({} if progress else {"disable": True})
    )
    for s in range(0, n, batch_size):
        items = [dataset[i] for i in range(s, min(n, s + batch_size))]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([torch.as_tensor(it["label"]) for it in items])
        gens = sampling.generators([sdedit.image_seed(seed, it["name"]) for it in items])
        t0 = time.perf_counter()
        out, hook = sgg_translate(
            unet, scheduler, x, y, guide if guided else None, cfg, generator=gens, return_hook=True
        )
        seconds += time.perf_counter() - t0
        imgs.append(out.clamp(-1, 1))
        labs.append(y)
        if hook is not None:
            hists.append(hook.history)
        bar.update(len(items))
    bar.close()
    res = {
        "images": torch.cat(imgs),
        "labels": torch.cat(labs),
        "names": names,
        "seconds_per_image": seconds / n,
        "history": _step_means(hists),
    }
    if path is not None:
        runs.atomic_torch_save(res, path)
    return res


def guide_id(model) -> str | None:
    """sha1 of a guide's weights (which guide made a translated set)."""
    return _weights_sha(model)


def _weights_sha(model) -> str | None:
    if model is None:
        return None
    h = __import__("hashlib").sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def as_items(images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Tensors as a list of dataset items (for seg.evaluate / metrics on in-memory sets)."""
    return [{"image": im, "label": lb, "name": str(i)} for i, (im, lb) in enumerate(zip(images, labels))]


@torch.no_grad()
def guide_loss_value(guide, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Mean pixel CE of ``guide`` on (clean) images against the labels: the loss SGG descends."""
    was = guide.training
    guide.eval()
    dev = next(guide.parameters()).device
    tot, cnt = 0.0, 0
    for s in range(0, len(images), batch_size):
        lg = guide(images[s : s + batch_size].to(dev)).float()
        y = labels[s : s + batch_size].to(dev)
        tot += float(F.cross_entropy(lg, y, ignore_index=IGNORE_INDEX, reduction="sum"))
        cnt += int((y != IGNORE_INDEX).sum())
    guide.train(was)
    return tot / max(1, cnt)


def translation_scores(
    images: torch.Tensor, labels: torch.Tensor, ref=None, guide=None, target_images=None, batch_size: int = 64
) -> dict:
    """How a translated subset reads: ``label_consistency`` (mIoU of a target-trained reference that is
    NOT the guide, vs the source labels), ``kid`` to ``target_images`` (domain distance), and the
    guide's own loss / mIoU (what guidance optimises: low values alone prove nothing)."""
    from dasslab import metrics, seg

    items = as_items(images, labels)
    out = {}
    if ref is not None:
        out["label_consistency"] = metrics.label_consistency(ref, items, batch_size=batch_size)
    if target_images is not None:
        out["kid"] = metrics.domain_distance(images, target_images)["kid"]
    if guide is not None:
        out["guide_ce"] = guide_loss_value(guide, images, labels, batch_size)
        out["guide_miou"] = seg.evaluate(guide, items, batch_size=batch_size)["mIoU"]
    return out


def compare(
    unet,
    scheduler,
    dataset,
    runs_: dict,
    n: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir=None,
    ref=None,
    target_images=None,
    score_guide=None,
    progress: bool = True,
):
    """Translate the first ``n`` items of ``dataset`` under several settings and score each.

    ``runs_``: ``{name: (SGGConfig, guide or None)}``. Returns ``(table, outputs)``: a pandas table (one
    row per name: strength, scales, schedule, guide input, seconds per image, :func:`translation_scores`;
    the guide's numbers come from ``score_guide`` when given, else from the run's own guide) and
    ``{name: translate_subset result}``.
    """
    import pandas as pd

    rows, outs = [], {}
    for name, (cfg, guide) in runs.progress(
        list(runs_.items()), desc="settings", **({} if progress else {"disable": True})
    ):
        res = translate_subset(
            unet, scheduler, dataset, guide, cfg, n=n, seed=seed, batch_size=batch_size, cache_dir=cache_dir
        )
        outs[name] = res
        sc = translation_scores(
            res["images"],
            res["labels"],
            ref=ref,
            guide=score_guide if score_guide is not None else guide,
            target_images=target_images,
        )
        guided = guide is not None and cfg.guided
        rows.append(
            {
                "name": name,
                "strength": cfg.strength,
                "schedule": cfg.schedule if guided else "none",
                "lambda_lcg": cfg.lambda_lcg if guided else 0.0,
                "lambda_gsg": cfg.lambda_gsg if guided else 0.0,
                "guide_input": cfg.guide_input if guided else None,
                "sec_per_image": res["seconds_per_image"],
                **sc,
            }
        )
    return pd.DataFrame(rows), outs


@torch.no_grad()
def miou_under_noise(
    model, dataset, scheduler, strengths: Sequence[float], n: int = 64, seed: int = 0, batch_size: int = 64
) -> list[dict]:
    """mIoU of ``model`` on the first ``n`` items of ``dataset`` diffused to each strength (x_t, not
    denoised): why a guide that reads x_k must be trained on noisy images."""
    from dasslab import seg

    n = min(int(n), len(dataset))
    items = [dataset[i] for i in range(n)]
    x = torch.stack([it["image"] for it in items])
    y = torch.stack([torch.as_tensor(it["label"]) for it in items])
    rows = []
    for st in strengths:
        t = sampling.strength_to_timestep(scheduler, float(st))
        xt = x if t < 0 else sampling.noise_to(scheduler, x, t, torch.Generator().manual_seed(seed))
        rows.append(
            {
                "strength": float(st),
                "t": t,
                "mIoU": seg.evaluate(model, as_items(xt, y), batch_size=batch_size)["mIoU"],
            }
        )
    return rows


def chain_snapshots(
    unet,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    guide,
    cfg: SGGConfig,
    generator=None,
    every: int = 1,
) -> list[dict]:
    """The reverse chain of one SGG (or SDEdit) call, for figures: per recorded step the timestep,
    the guidance kind and the model's clean estimate x0_hat (CPU)."""
    inner = make_hook(guide, labels, cfg)
    snaps = []

    def hook(state):
        if state.index % every == 0 or state.index == state.n_steps - 1:
            snaps.append(
                {
                    "index": state.index,
                    "t": state.t,
                    "kind": step_kind(cfg.schedule, state.index) if inner is not None else "none",
                    "x0_hat": state.x0_hat.detach().float().cpu().clamp(-1, 1),
                }
            )
        return inner(state) if inner is not None else None

    hook.needs_grad = bool(getattr(inner, "needs_grad", False))
    from dasslab.diffusion import sdedit

    sdedit.sdedit(
        unet,
        scheduler,
        images,
        cfg.strength,
        generator,
        steps=cfg.num_steps,
        sampler=cfg.sampler,
        eta=cfg.eta,
        guidance=hook,
    )
    return snaps


# --------------------------------------------------------------------------------------------------
# guides
# --------------------------------------------------------------------------------------------------
def photometric_jitter(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Random colour changes per image (channel permutation, per-channel gain and offset, partial
    greyscale) on [-1, 1] images: a guide trained through it must read shape and layout, not the
    source palette, so its gradients do not paint source colours back into the translation."""
    if strength <= 0:
        return x
    B = x.shape[0]
    perm = torch.stack([torch.randperm(3) for _ in range(B)]).to(x.device)
    out = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gain = 1 + strength * 0.5 * (2 * torch.rand(B, 3, 1, 1) - 1)
    offset = strength * 0.4 * (2 * torch.rand(B, 3, 1, 1) - 1)
    out = out * gain.to(x) + offset.to(x)
    grey = (torch.rand(B, 1, 1, 1) < 0.2 * strength).to(x)
    out = grey * out.mean(1, keepdim=True).expand_as(out) + (1 - grey) * out
    return out.clamp(-1, 1)


def pgd_perturb(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 3) -> torch.Tensor:
    """``x`` moved, within an L-inf ball of radius ``eps``, to raise ``model``'s pixel CE against ``y``
    (projected gradient ascent from a random start, step 2.5 eps / steps; Madry et al. 2018).

    Runs the model in eval mode (BatchNorm statistics untouched) and returns a detached batch in
    [-1, 1]. Training a guide on such inputs makes it robust, and a robust classifier's input gradient
    points at changes a person would see (Santurkar et al. 2019; Kawar et al. 2022 use exactly that for
    classifier guidance), not at the faint patterns a plain CNN's gradient writes.
    """
    if eps <= 0 or steps < 1:
        raise ValueError(f"pgd_perturb: eps={eps} must be > 0 and steps={steps} >= 1")
    was_training = model.training
    model.eval()
    try:
        d = (torch.rand_like(x) * 2 - 1) * eps
        for _ in range(int(steps)):
            d.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x + d).float(), y.long(), ignore_index=IGNORE_INDEX)
                (g,) = torch.autograd.grad(loss, d)
            d = (d.detach() + 2.5 * eps / steps * g.sign()).clamp(-eps, eps)
    finally:
        model.train(was_training)
    return (x + d).clamp(-1, 1).detach()


class GuideLoss:
    """The guide's training loss for ``seg.train_segmenter``'s ``loss_fn`` hook: cross-entropy after
    optional photometric jitter (:func:`photometric_jitter`), for a noise-aware guide diffusion to a
    random timestep in [0, t_max] (a share ``p_clean`` stays clean), as the noisy classifiers of
    classifier guidance are trained, and optionally adversarial training (``adv_eps`` > 0: the CE is
    taken on :func:`pgd_perturb` inputs): a robust guide. Randomness comes from torch's global RNG,
    which the training loop seeds and checkpoints."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor | None = None,
        t_max: int | None = None,
        p_clean: float = 0.1,
        photometric: float = 0.0,
        adv_eps: float = 0.0,
        adv_steps: int = 3,
    ):
        self.abar = (
            None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu()
        )
        if self.abar is not None and (t_max is None or not 0 <= int(t_max) < len(self.abar)):
            raise ValueError(f"GuideLoss: t_max={t_max} outside [0, {len(self.abar) - 1}]")
        if adv_eps < 0 or int(adv_steps) < 1:
            raise ValueError(
                f"GuideLoss: guide_adv_eps={adv_eps} must be >= 0 (0 = off) and guide_adv_steps={adv_steps} >= 1"
            )
        self.t_max = None if self.abar is None else int(t_max)
        self.p_clean, self.photometric = float(p_clean), float(photometric)
        self.adv_eps, self.adv_steps = float(adv_eps), int(adv_steps)

    def identity(self) -> dict:
        d = {"loss": "GuideLoss", "photometric": self.photometric}
        if self.abar is not None:
            d.update(
                t_max=self.t_max,
                p_clean=self.p_clean,
                abar=_sha([round(float(a), 8) for a in self.abar[:: max(1, len(self.abar) // 50)]]),
            )
        if self.adv_eps > 0:
            d.update(adv_eps=self.adv_eps, adv_steps=self.adv_steps)
        return d

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.abar is None:
            return x
        B = x.shape[0]
        t = torch.randint(0, self.t_max + 1, (B,))
        clean = torch.rand(B) < self.p_clean
        a = self.abar[t].to(x)
        a = torch.where(clean.to(x.device), torch.ones_like(a), a).view(-1, 1, 1, 1)
        eps = torch.randn(x.shape).to(x)
        return a.sqrt() * x + (1 - a).sqrt() * eps

    def __call__(self, model, batch):
        from dasslab import seg

        x = self.noise(photometric_jitter(batch["image"], self.photometric))
        if self.adv_eps > 0:  # attack the bare module: a DDP wrapper would sync on a backward it never sees
            x = pgd_perturb(getattr(model, "module", model), x, batch["label"], self.adv_eps, self.adv_steps)
        return seg.cross_entropy_loss(model, {**batch, "image": x})


def NoisyCE(alphas_cumprod, t_max: int, p_clean: float = 0.1, photometric: float = 0.0) -> GuideLoss:
    """The noise-aware guide loss (a :class:`GuideLoss` with a noise schedule)."""
    return GuideLoss(alphas_cumprod, t_max, p_clean, photometric)


def guide_spec(table: dict) -> tuple[str, dict]:
    """The guide architecture from a notebook table: (model name, kwargs); small by default."""
    return str(table.get("guide_model", "unet-small")), dict(
        table.get("guide_kwargs", {"width": 8, "depth": 2}) or {}
    )


def guide_train_config(cfg, table: dict | None = None, seed: int = 0, **overrides):
    from dasslab import seg

    table = cfg.nb if table is None else table
    kw = {}
    if table.get("guide_iters"):
        kw["iters"] = int(table["guide_iters"])
    kw.update(overrides)
    return seg.train_config(cfg, seed=seed, **kw)


def source_guide(
    rd,
    cfg,
    guide_input: str,
    scheduler=None,
    t_max: int | None = None,
    sets=None,
    table: dict | None = None,
    seed: int = 0,
    device=None,
):
    """The source-trained guiding segmenter (cached under ``segmenters/sgg-guide-<input>``): trained on
    clean source images for ``guide_input="x0"``, noise-aware (:class:`NoisyCE` up to ``t_max``) for
    ``"noisy"``. One training loop: ``seg.get_or_train`` -> ``seg.train_segmenter``."""
    from dasslab import datasets, seg

    if guide_input not in GUIDE_INPUTS:
        raise ValueError(f"guide_input={guide_input!r}; valid: {', '.join(GUIDE_INPUTS)}")
    table = cfg.nb if table is None else table
    sets = sets or datasets.benchmark_sets(cfg)
    name, kwargs = guide_spec(table)
    loss_fn, extra = guide_loss(guide_input, scheduler, t_max, **guide_training(table, guide_input))
    runs.seed_everything(seed)
    init = seg.build_segmenter(name, 19, **kwargs)
    tc = guide_train_config(cfg, table, seed=seed)
    return seg.get_or_train(
        rd,
        f"sgg-guide-{guide_input}",
        [sets["source_train"]],
        cfg,
        seed=seed,
        loss_fn=loss_fn,
        init=init,
        fingerprint_extra=extra,
        tc=tc,
        device=device,
    )


def guide_loss(
    guide_input: str,
    scheduler=None,
    t_max: int | None = None,
    photometric: float = 0.0,
    adv_eps: float = 0.0,
    adv_steps: int = 3,
):
    """(loss_fn, fingerprint extra) of a guide: plain, colour-jittered and/or adversarial CE for x0
    guides, the same after diffusion to random timesteps for noise-aware ones (:class:`GuideLoss`)."""
    if guide_input == "x0":
        if not photometric and not adv_eps:
            return None, {"guide_input": "x0"}
        fn = GuideLoss(photometric=photometric, adv_eps=adv_eps, adv_steps=adv_steps)
        return fn, {"guide_input": "x0", **fn.identity()}
    if guide_input != "noisy":
        raise ValueError(f"guide_input={guide_input!r}; valid: {', '.join(GUIDE_INPUTS)}")
    if scheduler is None or t_max is None:
        raise ValueError("a noise-aware guide needs the DDPM scheduler and t_max (the deepest timestep used)")
    fn = GuideLoss(scheduler.alphas_cumprod, t_max, photometric=photometric, adv_eps=adv_eps, adv_steps=adv_steps)
    return fn, {"guide_input": "noisy", **fn.identity()}


def guide_training(table: dict, guide_input: str = "x0") -> dict:
    """The guide-training keys of a notebook table as :func:`guide_loss` keywords (absent keys: off).

    ``guide_adv_eps`` applies to the clean (x0) guide only: the noise-aware guide already trains on
    inputs diffused to random timesteps, Gaussian noise augmentation that smooths its gradients as
    adversarial training does (randomized smoothing; Kaur et al. 2019), at no extra cost."""
    if guide_input not in GUIDE_INPUTS:
        raise ValueError(f"guide_input={guide_input!r}; valid: {', '.join(GUIDE_INPUTS)}")
    adv = guide_input == "x0"
    return {
        "photometric": float(table.get("guide_photometric", 0.0) or 0.0),
        "adv_eps": float(table.get("guide_adv_eps", 0.0) or 0.0) if adv else 0.0,
        "adv_steps": int(table.get("guide_adv_steps", 3) or 3),
    }


# --------------------------------------------------------------------------------------------------
# the run-level entry (notebook 02 and the CLI)
# --------------------------------------------------------------------------------------------------
def run_config(cfg, **overrides) -> SGGConfig:
    return config_from_table(cfg.nb, **overrides)


def translate_run(
    rd,
    cfg,
    sgg_cfg: SGGConfig | None = None,
    out_dir=None,
    sets=None,
    pipe=None,
    guide=None,
    limit: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    method: str = "sgg",
    device=None,
) -> dict:
    """SGG over the run's source_train set with the run's target DDPM (notebook 01) into
    ``rd.translated(method)`` (or ``out_dir``). The guide defaults to :func:`source_guide`. Returns the
    translation record."""
    from dasslab import datasets
    from dasslab.diffusion import ddpm

    sgg_cfg = sgg_cfg or run_config(cfg)
    sets = sets or datasets.benchmark_sets(cfg)
    if pipe is None:
        path = rd.require(ddpm.ddpm_dir(rd), producer=ddpm.NOTEBOOK)
        pipe = ddpm.load_ddpm(path, device=device or cfg.get("device"))
    seed = int(cfg.nb.get("seed", 0) if seed is None else seed)
    if guide is None and sgg_cfg.guided:
        t_max = sampling.strength_to_timestep(
            pipe.scheduler, float(cfg.nb.get("guide_t_max_strength", sgg_cfg.strength))
        )
        guide = source_guide(rd, cfg, sgg_cfg.guide_input, pipe.scheduler, t_max, sets=sets, device=device)
    gid = guide_id(guide)
    guide = guide.to(next(pipe.unet.parameters()).device) if guide is not None else None
    return translate_dataset_sgg(
        pipe.unet,
        pipe.scheduler,
        guide,
        sets["source_train"],
        out_dir or rd.translated(method),
        sgg_cfg,
        seed=seed,
        batch_size=int(batch_size or cfg.nb.get("batch_size", 16)),
        limit=limit if limit is not None else (cfg.nb.get("limit") or None),
        method=method,
        extra={"guide": gid},
    )


def _cmd_sgg(args) -> int:
    cfg = runs.load_config(
        args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device, data_root=args.data_root
    )
    runs.set_threads()
    rd = runs.RunDir(cfg.run_dir)
    over = {
        k: getattr(args, k)
        for k in (
            "strength",
            "lambda_lcg",
            "lambda_gsg",
            "schedule",
            "guide_input",
            "sampler",
            "num_steps",
            "grad_clip",
            "grad_blur",
        )
    }
    sgg_cfg = run_config(cfg, **over)
    t0 = time.perf_counter()
    out = args.out or rd.translated("sgg")
    rec = translate_run(
        rd, cfg, sgg_cfg, out_dir=out, limit=args.limit, seed=args.seed, batch_size=args.batch_size
    )
    print(
        f"SGG translations ({rec['n_images']} images, {rec['seconds_per_image'] or 0:.3f} s/image) in {out} "
        f"[{time.perf_counter() - t0:.0f} s]"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sgg",
        help="translate the source set with semantic gradient guidance (notebook 02's set)",
        description="Label-guided diffusion translation (Peng et al. 2023) of the run's source_train set with "
        "the run's target DDPM into artifacts/translated/sgg (GTA5 layout, source labels). "
        f"Settings default to the profile's [{NOTEBOOK}] table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--profile", default="demo", help="profile name or .toml path")
    p.add_argument("--run-dir", required=True, help="run directory holding artifacts/ddpm (notebook 01)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", default=None, help="dataset root (default: the profile's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: artifacts/translated/sgg)")
    p.add_argument("--strength", type=float, default=None, help="depth K/T")
    p.add_argument("--lambda-lcg", dest="lambda_lcg", type=float, default=None)
    p.add_argument("--lambda-gsg", dest="lambda_gsg", type=float, default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--guide-input", dest="guide_input", choices=GUIDE_INPUTS, default=None)
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--num-steps", dest="num_steps", type=int, default=None, help="steps over the full chain")
    p.add_argument("--grad-clip", dest="grad_clip", type=float, default=None)
    p.add_argument("--grad-blur", dest="grad_blur", type=float, default=None,
                   help="Gaussian low-pass of the guidance gradient, sigma in pixels (0 = off)")
    p.add_argument("--limit", type=int, default=None, help="translate only the first n images")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.set_defaults(func=_cmd_sgg)


__all__ = [
    "GUIDE_INPUTS",
    "SCHEDULES",
    "GuideLoss",
    "NoisyCE",
    "SGGConfig",
    "SGGGuidance",
    "as_items",
    "chain_snapshots",
    "blur_gradient",
    "class_pairs",
    "compare",
    "config_from_table",
    "gsg_loss",
    "guidance_gradient",
    "guide_id",
    "guide_loss",
    "guide_loss_value",
    "guide_training",
    "lcg_loss",
    "make_hook",
    "merge_class_gradients",
    "miou_under_noise",
    "pgd_perturb",
    "photometric_jitter",
    "pixel_weights",
    "register",
    "sgg_translate",
    "source_guide",
    "translate_dataset_sgg",
    "translate_run",
    "translate_subset",
    "translation_scores",
    "x0_jacobian",
]
