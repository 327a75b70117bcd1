"""Stochastic inversion followed by guided DDIM: the image-transfer loop both backends share.

ZoDi does not start the reverse process from pure noise (that would throw the source image away) nor
from a deterministic DDIM inversion (slow, and it reproduces the source too faithfully). As in the
official code it (1) noises the clean input x0 to t = strength * T with random noise, (2) asks the
*conditioned* model (layout + prompt) what noise it sees there, (3) re-noises x0 with that predicted
noise, and (4) runs DDIM (eta = 1, classifier-free guidance) from t back to 0:

    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I)
    eps^ = eps_theta(x_t, t | layout, prompt)
    x_t' = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps^
    x_{t_k-1} = DDIM(x_{t_k}, eps_cfg(x_{t_k}), eta=1)   for the last floor(strength * N) of N steps

Step (2)-(3) puts the start point where the *conditioned* model expects a noisy version of x0 to be,
so the early reverse steps already pull towards the prompt's domain while the layout keeps content.
The step in (2) uses the conditional prediction without guidance (our reading of "the conditioned
model"); the sampling steps in (4) use guidance.

Everything here is backend-agnostic: a backend hands over ``eps_fn(x, t, guidance_scale)`` returning
the noise prediction (guidance applied inside when ``guidance_scale > 1``) and a DDIM scheduler.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def start_index(num_inference_steps: int, strength: float) -> int:
    """Index into the DDIM timesteps where the reverse process starts (0 = pure noise end)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    k = int(strength * num_inference_steps)
    return num_inference_steps - k


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU generators give device-independent results)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


@torch.no_grad()
def stochastic_inversion_transfer(
    x0: torch.Tensor,
    eps_fn: EpsFn,
    scheduler: DDIMScheduler,
    num_inference_steps: int,
    strength: float,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    return_start: bool = False,
):
    """Transfer ``x0`` (pixels or latents) with the conditioned model behind ``eps_fn``.

    Returns the regenerated tensor, shaped like ``x0`` (and the re-noised start point when
    ``return_start``). ``strength = 0`` returns ``x0`` unchanged.
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError("the inversion scheduler must use prediction_type='epsilon'; backends convert "
                         f"their model outputs to noise (got {scheduler.config.prediction_type!r})")
    first = start_index(num_inference_steps, strength)
    if first >= num_inference_steps:
        return (x0, x0) if return_start else x0
    scheduler.set_timesteps(num_inference_steps, device=x0.device)
    timesteps = scheduler.timesteps[first:]
    t_start = timesteps[0]
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t_start.reshape(1))
    eps_hat = eps_fn(x_t, t_start, 1.0)
    x = scheduler.add_noise(x0, eps_hat.to(x0.dtype), t_start.reshape(1))
    start = x
    for t in timesteps:
        eps = eps_fn(x, t, guidance_scale)
        x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return (x, start) if return_start else x


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
