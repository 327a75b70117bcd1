"""The one reverse-diffusion loop every translator uses (SDEdit, SGG, PTL, unconditional samples).

The loop does the DDPM / DDIM update itself from the scheduler's ``alphas_cumprod`` (tests check it
against ``DDPMScheduler.step`` / ``DDIMScheduler.step``), so that every step exposes what guidance
needs: the model's epsilon, the clean estimate x0_hat, the mean of p(x_prev | x_t) and its variance.
Each step is ``x_prev = mean + sqrt(Sigma) * z``; a guidance hook may replace ``mean`` but never draws
noise, so the noise stream depends only on the generator: ``guidance=None`` and a hook that returns
the mean unchanged give bit-identical results.

Guidance hook (classifier-guidance style, Dhariwal & Nichol 2021)::

    def hook(state: StepState) -> torch.Tensor | None:
        x = state.x_t                        # requires grad when hook.needs_grad is True
        loss = seg_loss(g(x), y)             # or g(state.x0_hat): graph goes through the UNet
        grad = torch.autograd.grad(loss, x)[0]
        return state.shift(grad, scale)      # DDPM: mean - scale * Sigma * grad
                                             # DDIM: eps + scale * sqrt(1 - abar_t) * grad -> mean

A hook is any callable; an attribute ``needs_grad = True`` on it makes the loop run the UNet with
``x_t.requires_grad_()`` under grad mode, so ``state.eps`` and ``state.x0_hat`` carry the graph from
``state.x_t``. Without it everything runs under ``torch.no_grad`` and a hook that needs a gradient of
its own makes a leaf (``x = state.x_t.detach().requires_grad_()``) inside ``torch.enable_grad()``.
Per-class guidance (LCG) computes one gradient per class and returns
``state.shift(sum_c m_c * grad_c, scale)``: with a shared noise draw that equals merging
per-class samples ``sum_c m_c * x_prev_c``. The step index (``state.index``) lets a hook alternate.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dasslab import runs

Generator = torch.Generator | Sequence[torch.Generator] | None


# --------------------------------------------------------------------------------------------------
# schedules and noise
# --------------------------------------------------------------------------------------------------
def scheduler_kind(scheduler) -> str:
    """``"ddpm"`` or ``"ddim"`` from the scheduler class (diffusers DDPMScheduler / DDIMScheduler)."""
    name = type(scheduler).__name__
    if name == "DDPMScheduler":
        return "ddpm"
    if name == "DDIMScheduler":
        return "ddim"
    raise TypeError(f"scheduler {name!r} is not supported: use diffusers DDPMScheduler or DDIMScheduler")


def _check_config(scheduler) -> None:
    c = scheduler.config
    if c.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler prediction_type={c.prediction_type!r}: dasslab models predict 'epsilon'")
    if c.get("thresholding", False):
        raise ValueError("scheduler thresholding=True is not supported (use clip_sample)")
    if scheduler_kind(scheduler) == "ddpm" and c.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_large"):
        raise ValueError(f"DDPMScheduler variance_type={c.variance_type!r} is not supported "
                         "(fixed_small or fixed_large)")


def as_ddim(scheduler):
    """A DDIMScheduler with the same noise schedule (for fast sampling from a DDPM-trained model)."""
    from diffusers import DDIMScheduler

    if scheduler_kind(scheduler) == "ddim":
        return scheduler
    return DDIMScheduler.from_config(scheduler.config)


def as_ddpm(scheduler):
    """A DDPMScheduler with the same noise schedule."""
    from diffusers import DDPMScheduler

    if scheduler_kind(scheduler) == "ddpm":
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def chain_timesteps(scheduler, t_start: int | None = None, num_steps: int | None = None) -> list[int]:
    """Descending timesteps from ``t_start`` (default T-1) to 0: every step, or ``num_steps`` evenly
    spaced ones (a skipped chain; DDIM's usual use, also valid for ancestral DDPM)."""
    T = num_train_timesteps(scheduler)
    t_start = T - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < T:
        raise ValueError(f"t_start={t_start} outside [0, {T - 1}]")
    if num_steps is None or num_steps >= t_start + 1:
        return list(range(t_start, -1, -1))
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if num_steps == 1:
        return [t_start]
    ts = [round(t_start - i * t_start / (num_steps - 1)) for i in range(num_steps)]
    return sorted(set(ts), reverse=True)


def strength_to_timestep(scheduler, strength: float) -> int:
    """SDEdit depth: strength = n / T; the noised source sits at timestep index n - 1 (-1 for n = 0)."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} must lie in [0, 1]")
    T = num_train_timesteps(scheduler)
    return round(float(strength) * T) - 1


def sdedit_timesteps(scheduler, strength: float, num_steps: int | None = None) -> list[int]:
    """The reverse chain of an SDEdit at ``strength``. ``num_steps`` counts steps over the FULL chain
    (as in diffusers img2img): strength 0.5 with 50 steps runs 25. None = every step. [] at strength 0."""
    t = strength_to_timestep(scheduler, strength)
    if t < 0:
        return []
    k = None if num_steps is None else max(1, round(num_steps * (t + 1) / num_train_timesteps(scheduler)))
    return chain_timesteps(scheduler, t_start=t, num_steps=k)


def randn(shape, generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (the same numbers on every device). With a list of
    generators, item i comes from generator i alone, so results do not depend on the batch."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        out = torch.randn(shape, generator=generator, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed (per-image seeding)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _abar(scheduler, t: int, device, dtype) -> torch.Tensor:
    """alpha_bar at timestep t; at t < 0 the value after the last step (1, or alpha_bar_0 for a DDIM
    scheduler with set_alpha_to_one=False)."""
    ac = scheduler.alphas_cumprod
    if t >= 0:
        v = ac[t]
    elif scheduler_kind(scheduler) == "ddim":
        v = scheduler.final_alpha_cumprod
    else:
        v = torch.tensor(1.0)
    return torch.as_tensor(v, dtype=torch.float32).to(device=device, dtype=dtype)


def noise_to(scheduler, x0: torch.Tensor, t, generator: Generator = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Forward diffusion in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    ``t`` is an int or a per-item tensor of timesteps; ``noise`` (else drawn from ``generator``).
    """
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    ac = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    tt = torch.as_tensor(t, device=x0.device).long().reshape(-1)
    T = num_train_timesteps(scheduler)
    if (tt < 0).any() or (tt >= T).any():
        raise ValueError(f"timestep {t} outside [0, {T - 1}]")
    a = ac[tt].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# --------------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------------
@dataclass
class StepState:
    """Everything a guidance hook may use at one reverse step (from ``t`` to ``t_prev``)."""

    x_t: torch.Tensor           # current sample (B,3,H,W)
    t: int                      # its timestep
    t_prev: int                 # the step's target timestep (-1 after the last step)
    index: int                  # 0 for the first step of this call
    n_steps: int                # steps in this call
    kind: str                   # "ddpm" | "ddim"
    eps: torch.Tensor           # the model's noise prediction
    x0_hat: torch.Tensor        # clean estimate from eps (clipped when the scheduler clips)
    mean: torch.Tensor          # mean of p(x_prev | x_t)
    variance: torch.Tensor      # Sigma_t (scalar tensor): x_prev = mean + sqrt(Sigma_t) z
    alpha_bar_t: torch.Tensor
    alpha_bar_prev: torch.Tensor
    eta: float = 0.0
    clip: float | None = None
    extras: dict = field(default_factory=dict)  # free room for hooks (e.g. logging)

    # -- mean from a (shifted) prediction ----------------------------------------------------------
    def x0_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        x0 = (self.x_t - (1 - self.alpha_bar_t).sqrt() * eps) / self.alpha_bar_t.sqrt()
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0

    def mean_from_x0(self, x0: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        a_t, a_p = self.alpha_bar_t, self.alpha_bar_prev
        if self.kind == "ddpm":
            alpha = a_t / a_p
            beta = 1 - alpha
            return (a_p.sqrt() * beta / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_p) / (1 - a_t)) * self.x_t
        eps = self.eps if eps is None else eps
        return a_p.sqrt() * x0 + (1 - a_p - self.variance).clamp(min=0).sqrt() * eps

    def mean_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mean_from_x0(self.x0_from_eps(eps), eps)

    def shift(self, grad: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """Classifier guidance by the gradient of a LOSS (descend it): DDPM shifts the mean,
        mean - scale * Sigma * grad; DDIM shifts the noise, eps + scale * sqrt(1 - abar_t) * grad."""
        if self.kind == "ddpm":
            return self.mean - scale * self.variance * grad
        return self.mean_from_eps(self.eps + scale * (1 - self.alpha_bar_t).sqrt() * grad)


Hook = Callable[[StepState], "torch.Tensor | None"]


def _unet_eps(unet, x: torch.Tensor, t: int) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = unet(x, tt)
    return out.sample if hasattr(out, "sample") else out


def _model_dtype_device(unet, x):
    try:
        p = next(unet.parameters())
        return p.device, p.dtype
    except (StopIteration, AttributeError):
        return x.device, x.dtype


def reverse_diffusion(unet, scheduler, x_t: torch.Tensor, timesteps: Sequence[int] | int | None = None,
                      generator: Generator = None, guidance: Hook | None = None, x0_hook: Hook | None = None,
                      eta: float = 0.0, progress: bool | str = False) -> torch.Tensor:
    """Runs the reverse chain from ``x_t`` (at ``timesteps[0]``) down to a clean image.

    ``timesteps``: a descending sequence (see :func:`chain_timesteps`, :func:`sdedit_timesteps`); an
    int ``t`` means every step from t to 0; None means the full chain. The update follows the
    scheduler class: ancestral DDPM (noise added while t > 0) or DDIM with ``eta`` (noise drawn at
    every step when eta > 0, as diffusers does). ``generator``: one torch.Generator or one per image.
    ``x0_hook(state)`` runs first and may return a replacement x0_hat (the mean is recomputed);
    ``guidance(state)`` may return a new mean (see the module docstring). Returns x_0 (B,3,H,W).
    """
    _check_config(scheduler)
    kind = scheduler_kind(scheduler)
    if kind == "ddpm" and eta:
        raise ValueError("eta only applies to a DDIMScheduler")
    if timesteps is None:
        timesteps = chain_timesteps(scheduler)
    elif isinstance(timesteps, int):
        timesteps = chain_timesteps(scheduler, t_start=timesteps)
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if any(b >= a for a, b in itertools.pairwise(ts)):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:6]}...")
    if ts and not 0 <= ts[-1] <= ts[0] < num_train_timesteps(scheduler):
        raise ValueError(f"timesteps outside [0, {num_train_timesteps(scheduler) - 1}]")
    device, dtype = _model_dtype_device(unet, x_t)
    clip = float(scheduler.config.clip_sample_range) if scheduler.config.get("clip_sample", False) else None
    needs_grad = bool(getattr(guidance, "needs_grad", False))
    x = x_t.to(device=device, dtype=dtype)
    steps = runs.progress(range(len(ts)), desc=progress if isinstance(progress, str) else "reverse diffusion",
                          leave=False, **({} if progress else {"disable": True}))
    for i in steps:
        t = ts[i]
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = _abar(scheduler, t, device, dtype)
        a_p = _abar(scheduler, t_prev, device, dtype)
        if kind == "ddpm":
            beta = 1 - a_t / a_p
            var = beta * (1 - a_p) / (1 - a_t) if scheduler.config.variance_type == "fixed_small" else beta
            if scheduler.config.variance_type == "fixed_small":
                var = var.clamp(min=1e-20)
            noisy = t > 0
        else:
            var = (eta ** 2) * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
            noisy = eta > 0
        with torch.set_grad_enabled(needs_grad):
            xin = x.detach().requires_grad_(needs_grad)
            eps = _unet_eps(unet, xin, t)
            state = StepState(x_t=xin, t=t, t_prev=t_prev, index=i, n_steps=len(ts), kind=kind, eps=eps,
                              x0_hat=None, mean=None, variance=var, alpha_bar_t=a_t, alpha_bar_prev=a_p,
                              eta=float(eta), clip=clip)
            state.x0_hat = state.x0_from_eps(eps)
            state.mean = state.mean_from_x0(state.x0_hat)
            if x0_hook is not None:
                new_x0 = x0_hook(state)
                if new_x0 is not None:
                    state.x0_hat = new_x0
                    state.mean = state.mean_from_x0(new_x0)
            mean = state.mean
            if guidance is not None:
                shifted = guidance(state)
                if shifted is not None:
                    if shifted.shape != mean.shape:
                        raise ValueError(f"guidance returned shape {tuple(shifted.shape)}, "
                                         f"expected the mean's {tuple(mean.shape)}")
                    mean = shifted
        mean = mean.detach()
        if noisy:
            x = mean + var.sqrt() * randn(mean.shape, generator, device, dtype)
        else:
            x = mean
    return x.detach()


# --------------------------------------------------------------------------------------------------
# unconditional samples
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(unet, scheduler, n: int, generator: Generator = None, ddim_steps: int | None = None,
           eta: float = 0.0, batch_size: int = 64, size: tuple[int, int] | None = None,
           progress: bool | str = False) -> torch.Tensor:
    """``n`` unconditional samples in [-1, 1] (n,3,H,W), on the CPU.

    Full ancestral DDPM chain by default; ``ddim_steps`` switches to DDIM with that many steps.
    ``generator``: one generator (batches drawn in order) or a list of n (one per image).
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for n={n} samples")
    cfg = getattr(unet, "config", None)
    if size is None:
        if cfg is None:
            raise ValueError("size=(H, W) is needed for a model without a diffusers config")
        s = cfg.sample_size
        size = tuple(s) if isinstance(s, (list, tuple)) else (s, s)
    channels = getattr(cfg, "in_channels", 3) if cfg is not None else 3
    sched = as_ddim(scheduler) if ddim_steps else scheduler
    ts = chain_timesteps(sched, num_steps=ddim_steps)
    device, dtype = _model_dtype_device(unet, torch.empty(0))
    outs = []
    batches = range(0, n, batch_size)
    bar = runs.progress(batches, desc=progress if isinstance(progress, str) else "sample",
                        **({} if progress else {"disable": True}))
    for start in bar:
        b = min(batch_size, n - start)
        g = generator[start:start + b] if isinstance(generator, (list, tuple)) else generator
        x = randn((b, channels, *size), g, device, dtype)
        outs.append(reverse_diffusion(unet, sched, x, ts, generator=g, eta=eta).float().cpu())
    return torch.cat(outs)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B,3,H,W) to uint8 (B,H,W,3) for display and PNG."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2):
    """A uint8 HxWx3 numpy grid of [-1, 1] images (for figures and PNGs)."""
    import numpy as np

    imgs = to_uint8(images).numpy()
    n, h, w, _ = imgs.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[k]
    return grid


__all__ = ["StepState", "as_ddim", "as_ddpm", "chain_timesteps", "generators", "image_grid", "noise_to", "randn",
           "reverse_diffusion", "sample", "scheduler_kind", "sdedit_timesteps", "strength_to_timestep", "to_uint8"]
