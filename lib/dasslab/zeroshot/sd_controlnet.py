"""ZoDi's own generator: Stable Diffusion 1.5 + the v1.1 segmentation ControlNet, loaded from disk.

Every component comes from a local directory the user names (``local_files_only``; nothing is fetched
from a hub). ``model_dir`` is a Stable Diffusion folder as ``save_pretrained`` writes it
(``unet/ vae/ text_encoder/ tokenizer/`` and optionally ``scheduler/``); ``controlnet_dir`` is a
ControlNet folder (``config.json`` + weights; default ``model_dir/controlnet``). The layout condition
is the Cityscapes colour label image, as ZoDi feeds ``*_gtFine_color.png`` to ``control_v11p_sd15_seg``.
Images are resized so the short side is ``short_side`` (512 in the paper), generated, and resized back.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dasslab.zeroshot.backends import TransferBackend, check_batch, colour_layout
from dasslab.zeroshot.inversion import guided, stochastic_inversion_transfer

#: SD 1.5's DDIM settings, used when the model folder has no scheduler/ sub-folder.
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                      "steps_offset": 1, "prediction_type": "epsilon"}
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(g)) for g in WEIGHT_GLOBS)


def missing_components(model_dir: str | Path, controlnet_dir: str | Path | None = None) -> list[str]:
    """What a Stable Diffusion + ControlNet folder pair lacks (empty when complete)."""
    model_dir = Path(model_dir)
    controlnet_dir = Path(controlnet_dir) if controlnet_dir else model_dir / "controlnet"
    if not model_dir.is_dir():
        return [f"{model_dir} (the Stable Diffusion folder itself)"]
    missing = []
    for sub in ("unet", "vae", "text_encoder"):
        folder = model_dir / sub
        if not (folder / "config.json").is_file():
            missing.append(f"{folder}/config.json")
        elif not _has_weights(folder):
            missing.append(f"{folder}/ weights (*.safetensors or *.bin)")
    tok = model_dir / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or
            ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        missing.append(f"{tok}/ (vocab.json + merges.txt, or tokenizer.json)")
    if not (controlnet_dir / "config.json").is_file():
        missing.append(f"{controlnet_dir}/config.json (the segmentation ControlNet)")
    elif not _has_weights(controlnet_dir):
        missing.append(f"{controlnet_dir}/ weights (*.safetensors or *.bin)")
    return missing


def load_components(model_dir: str | Path, controlnet_dir: str | Path | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
    """The pipeline's parts from local folders, or a ``FileNotFoundError`` listing every missing part."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = missing_components(model_dir, controlnet_dir)
    if missing:
        raise FileNotFoundError(
            "sd-controlnet backend: the local model folders are incomplete; missing:\n  - "
            + "\n  - ".join(missing)
            + "\nSave Stable Diffusion 1.5 with save_pretrained (unet/ vae/ text_encoder/ tokenizer/ "
              "scheduler/) and control_v11p_sd15_seg beside it; nothing is downloaded.")
    model_dir = Path(model_dir)
    controlnet_dir = Path(controlnet_dir) if controlnet_dir else model_dir / "controlnet"
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    kw = {"local_files_only": True, "torch_dtype": dtype}
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet", **kw),
        "vae": AutoencoderKL.from_pretrained(model_dir / "vae", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(model_dir / "text_encoder", **kw),
        "controlnet": ControlNetModel.from_pretrained(controlnet_dir, **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
    }
    if (model_dir / "scheduler" / "scheduler_config.json").is_file():
        sched = DDIMScheduler.from_pretrained(model_dir / "scheduler", local_files_only=True)
    else:
        sched = DDIMScheduler(**SD15_SCHEDULER)
    parts["scheduler"] = sched
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        parts[name].to(device).eval().requires_grad_(False)
    return parts


class SDControlNetBackend(TransferBackend):
    """Stable Diffusion + segmentation ControlNet with ZoDi's stochastic inversion (paper defaults)."""

    name = "sd-controlnet"

    def __init__(self, unet, vae, text_encoder, tokenizer, controlnet, scheduler, *,
                 num_inference_steps: int = 20, guidance_scale: float = 9.0, eta: float = 1.0,
                 prompt_suffix: str = ", best quality", negative_prompt: str = "lower quality, worst quality",
                 controlnet_scale: float = 1.0, short_side: int = 512, source: dict | None = None):
        from diffusers import DDIMScheduler

        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.controlnet = tokenizer, controlnet
        # DDIM with the model's own noise schedule; the loop needs epsilon outputs (SD 1.5 predicts them).
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.num_inference_steps, self.guidance_scale, self.eta = num_inference_steps, guidance_scale, eta
        self.prompt_suffix, self.negative_prompt = prompt_suffix, negative_prompt
        self.controlnet_scale, self.short_side = controlnet_scale, short_side
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.source = source or {}
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_dir(cls, model_dir, controlnet_dir=None, device="cpu", dtype=None, **kwargs) -> SDControlNetBackend:
        parts = load_components(model_dir, controlnet_dir, device=device, dtype=dtype)
        src = {"model_dir": str(model_dir), "controlnet_dir": str(controlnet_dir or Path(model_dir) / "controlnet")}
        return cls(**parts, source=src, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def settings(self) -> dict:
        return {"backend": self.name, **self.source, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "eta": self.eta, "prompt_suffix": self.prompt_suffix,
                "negative_prompt": self.negative_prompt, "controlnet_scale": self.controlnet_scale,
                "short_side": self.short_side}

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            max_len = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
            ids = self.tokenizer([text], padding="max_length", max_length=max_len, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            self._text_cache[text] = self.text_encoder(ids)[0]
        return self._text_cache[text]

    # ------------------------------------------------------------------ geometry
    def working_size(self, h: int, w: int) -> tuple[int, int]:
        """Short side -> ``short_side``, both sides rounded to what the VAE and UNet can halve."""
        scale = self.short_side / min(h, w)
        m = self.multiple
        return max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)

    # ------------------------------------------------------------------ transfer
    @torch.no_grad()
    def transfer(self, images, labels, prompt, strength, generator=None):
        check_batch(images, labels)
        B, _, H, W = images.shape
        h, w = self.working_size(H, W)
        dev, dt = self.device, self.dtype
        x = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        lab = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        cond_img = colour_layout(lab).to(dev, dt)
        posterior = self.vae.encode(x.to(dev, dt)).latent_dist
        z0 = posterior.sample(generator=generator) * self.vae.config.scaling_factor

        cond = self.encode_text(prompt + self.prompt_suffix).expand(B, -1, -1)
        uncond = self.encode_text(self.negative_prompt).expand(B, -1, -1)

        def eps_fn(z, t, scale):
            if scale == 1.0:
                zz, emb, ctrl = z, cond, cond_img
            else:
                zz, emb, ctrl = torch.cat([z, z]), torch.cat([uncond, cond]), torch.cat([cond_img, cond_img])
            down, mid = self.controlnet(zz.to(dt), t, encoder_hidden_states=emb, controlnet_cond=ctrl,
                                        conditioning_scale=self.controlnet_scale, return_dict=False)
            eps = self.unet(zz.to(dt), t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0].float()
            if scale == 1.0:
                return eps
            e_u, e_c = eps.chunk(2)
            return guided(e_u, e_c, scale)

        z = stochastic_inversion_transfer(z0.float(), eps_fn, self.scheduler, self.num_inference_steps,
                                          strength, self.guidance_scale, generator=generator, eta=self.eta)
        out = self.vae.decode((z / self.vae.config.scaling_factor).to(dt), return_dict=False)[0].float()
        out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        return out.clamp(-1, 1).to(images.device)
