"""The offline default backend: a small layout-to-image diffusion model, our "foundation model".

Stable Diffusion has seen millions of street photos at night, in fog, in rain, in snow, with captions;
none of them is the target set of a given adaptation task. Our stand-in has seen a ToyStreets corpus
(camera look, optionally the game look) under all five conditions with paraphrased captions, rendered
from layout seeds >= ``toystreets.CORPUS_SEED_OFFSET``, disjoint from every train/val split. It never
sees the evaluation prompts; text reaches it through a real pretrained sentence encoder (384-d), so
any prompt can be typed. The analogy is generous: the corpus comes from the same renderer as the
adverse val sets, so its "world knowledge" is far closer to the target than SD's is to ACDC.

Model: diffusers ``UNet2DModel`` on pixels, input = noisy image (3) + one-hot layout (19 classes +
ignore plane), text as FiLM: the sentence embedding is projected into the time-embedding space
(``class_embed_type="identity"``, scale-shift resnets). Classifier-free guidance comes from caption
dropout (a learned null embedding). Trained with Accelerate, checkpoints with ``save_state``
(safetensors), resumable; the finished model is cached in a folder keyed by its settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dasslab import runs
from dasslab.zeroshot.backends import NUM_CLASSES, TransferBackend, check_batch, one_hot_layout
from dasslab.zeroshot.inversion import guided, stochastic_inversion_transfer
from dasslab.zeroshot.text import TEXT_DIM, SentenceEncoder, captions_for

CORPUS_VERSION = 1
MODEL_FILE = "model.safetensors"


@dataclass
class EmbeddedConfig:
    """Everything that shapes the pretrained generator (its hash names the cache folder)."""

    size: tuple[int, int] = (32, 64)
    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the lowest-resolution block
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # "epsilon" | "sample" | "v_prediction" (learns fastest here)
    caption_dropout: float = 0.15
    # corpus
    n_corpus: int = 2000
    conditions: tuple[str, ...] = ("day", "night", "fog", "rain", "snow")
    domains: tuple[str, ...] = ("target",)
    corpus_seed: int = 0
    # training
    iters: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_iters: int = 50
    ema_decay: float = 0.995  # 0 = no EMA
    seed: int = 0
    ckpt_every: int = 250
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.size = tuple(int(s) for s in self.size)
        self.channels = tuple(int(c) for c in self.channels)
        self.conditions, self.domains = tuple(self.conditions), tuple(self.domains)
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"EmbeddedConfig.prediction_type must be epsilon, sample or v_prediction, "
                             f"got {self.prediction_type!r}")
        for c in self.conditions:
            captions_for(c)
        for d in self.domains:
            if d not in ("target", "source"):
                raise ValueError(f"EmbeddedConfig.domains holds {d!r}; use 'target' (camera) or 'source' (game)")
        if self.n_corpus < 1 or self.iters < 1 or self.batch_size < 1:
            raise ValueError("EmbeddedConfig: n_corpus, iters and batch_size must be >= 1")
        if min(self.size) % 2 ** (len(self.channels) - 1):
            raise ValueError(f"EmbeddedConfig.size {self.size} must be divisible by "
                             f"2**(len(channels)-1) = {2 ** (len(self.channels) - 1)}")

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise KeyError(f"EmbeddedConfig has no fields {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def corpus_key(self) -> str:
        d = {k: getattr(self, k) for k in ("size", "n_corpus", "conditions", "domains", "corpus_seed")}
        return _sha({"corpus_version": CORPUS_VERSION, **d})

    def key(self) -> str:
        d = self.to_dict()
        d.pop("ckpt_every")
        return _sha({"corpus_version": CORPUS_VERSION, **d})


def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ model
class LayoutDiffusion(nn.Module):
    """eps/x0/v prediction from (noisy image, timestep, one-hot layout, sentence embedding)."""

    def __init__(self, ecfg: EmbeddedConfig):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(ecfg.channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if ecfg.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        temb = ecfg.channels[0] * 4
        self.unet = UNet2DModel(
            sample_size=ecfg.size, in_channels=3 + NUM_CLASSES + 1, out_channels=3,
            block_out_channels=ecfg.channels, layers_per_block=ecfg.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), add_attention=ecfg.attention,
            class_embed_type="identity", resnet_time_scale_shift="scale_shift",
            norm_num_groups=min(8, ecfg.channels[0]), attention_head_dim=8)
        self.text_proj = nn.Sequential(nn.Linear(TEXT_DIM, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.null_text = nn.Parameter(torch.zeros(TEXT_DIM))

    def forward(self, x_t, t, layout, text):
        """``layout`` (B,20,H,W) one-hot; ``text`` (B,384) embeddings, rows of NaN = the null text."""
        drop = torch.isnan(text).any(dim=1, keepdim=True)
        text = torch.where(drop, self.null_text.expand_as(text), torch.nan_to_num(text))
        cond = self.text_proj(text)
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        return self.unet(torch.cat([x_t, layout], 1), t, class_labels=cond).sample


def make_scheduler(ecfg: EmbeddedConfig, kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = {"num_train_timesteps": ecfg.num_train_timesteps, "beta_schedule": ecfg.beta_schedule}
    if kind == "ddpm":
        return DDPMScheduler(prediction_type=ecfg.prediction_type, **kw)
    # sampling works on noise predictions (the inversion needs them); outputs are converted first
    # "trailing" spacing: the last k of N steps start at t = k T / N - 1, i.e. strength * T
    return DDIMScheduler(prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
                         set_alpha_to_one=True, timestep_spacing="trailing", **kw)


def to_epsilon(out: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, prediction_type: str):
    """Converts a model output of any prediction type to a noise prediction."""
    if prediction_type == "epsilon":
        return out
    ab = alphas_cumprod[t].to(x_t.device, x_t.dtype).reshape(-1, 1, 1, 1) if torch.is_tensor(t) \
        else torch.as_tensor(alphas_cumprod[t], dtype=x_t.dtype)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "sample":
        return (x_t - a * out) / s.clamp_min(1e-4)
    return a * out + s * x_t  # v-prediction


# ------------------------------------------------------------------------------------------ corpus
def default_render() -> Callable:
    from dasslab import toystreets

    return toystreets.render


def corpus_offset() -> int:
    from dasslab import toystreets

    return int(toystreets.CORPUS_SEED_OFFSET)


def corpus_cells(ecfg: EmbeddedConfig) -> list[tuple[str, str]]:
    return [(d, c) for d in ecfg.domains for c in ecfg.conditions]


def render_corpus(ecfg: EmbeddedConfig, render: Callable | None = None, seed_offset: int | None = None,
                  progress: bool = True) -> dict:
    """Images (N,H,W,3) uint8, labels (N,H,W) uint8, cell index (N,) and layout seeds of the corpus.

    Sample i uses layout seed ``offset + corpus_seed * n_corpus + i`` and corpus cell ``i mod cells``:
    every scene is new, never one of the benchmark's split scenes.
    """
    render = render or default_render()
    offset = corpus_offset() if seed_offset is None else int(seed_offset)
    cells = corpus_cells(ecfg)
    H, W = ecfg.size
    imgs = np.zeros((ecfg.n_corpus, H, W, 3), np.uint8)
    labs = np.zeros((ecfg.n_corpus, H, W), np.uint8)
    cell = np.arange(ecfg.n_corpus) % len(cells)
    seeds = offset + ecfg.corpus_seed * ecfg.n_corpus + np.arange(ecfg.n_corpus)
    for i in runs.progress(range(ecfg.n_corpus), desc="render corpus", **({} if progress else {"disable": True})):
        dom, cond = cells[cell[i]]
        img, lab = render(int(seeds[i]), ecfg.size, domain=dom, condition=cond)
        img, lab = np.asarray(img), np.asarray(lab)
        if img.shape != (H, W, 3) or lab.shape != (H, W):
            raise ValueError(f"render returned image {img.shape} / label {lab.shape}, expected {(H, W, 3)} / {(H, W)}")
        imgs[i], labs[i] = img, lab
    return {"images": imgs, "labels": labs, "cell": cell, "seeds": seeds}


def load_or_render_corpus(path: Path, ecfg: EmbeddedConfig, render=None, seed_offset=None) -> dict:
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        if str(data.get("key", "")) == ecfg.corpus_key():
            return data
    data = render_corpus(ecfg, render, seed_offset)
    data["key"] = np.array(ecfg.corpus_key())
    with runs.atomic_write(path) as f:
        np.savez_compressed(f, **data)
    return data


# ------------------------------------------------------------------------------------------ training
def _lr_lambda(ecfg: EmbeddedConfig):
    """Linear warm-up, then cosine decay to zero (plain floats: checkpoints load with weights_only)."""

    def f(step: int) -> float:
        return float(min(1.0, (step + 1) / max(1, ecfg.warmup_iters)) * 0.5 * (1 + np.cos(np.pi * step / ecfg.iters)))

    return f


def _ckpts(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.glob("step_*"):
            if (p / "done.json").is_file():
                out.append((int(p.name.split("_")[1]), p))
    return sorted(out)


def _mix(*xs: int) -> int:
    return int(_sha(list(xs))[:15], 16)


def pretrain(ecfg: EmbeddedConfig, out_dir: str | Path, render: Callable | None = None,
             seed_offset: int | None = None, device=None, encoder: SentenceEncoder | None = None,
             progress: bool = True) -> Path:
    """Trains (or resumes, or reuses) the embedded generator in ``out_dir``; returns ``out_dir``.

    A finished folder holds ``config.json`` (written last: its presence means complete),
    ``model.safetensors`` (EMA weights when ``ema_decay > 0``), ``history.csv`` and ``corpus.npz``.
    Data order and noise at step s depend only on (seed, s), so a resumed run matches an
    uninterrupted one.
    """
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    if is_complete(out_dir, ecfg):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    device = runs.pick_device(device)
    corpus = load_or_render_corpus(out_dir / "corpus.npz", ecfg, render, seed_offset)
    cells = corpus_cells(ecfg)
    encoder = encoder or SentenceEncoder()
    cell_caps = [captions_for(c, d) for d, c in cells]
    cap_emb = [encoder.encode(list(caps)) for caps in cell_caps]

    images = torch.from_numpy(corpus["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    labels = torch.from_numpy(corpus["labels"].astype(np.int64))
    cell = torch.from_numpy(corpus["cell"].astype(np.int64))
    N = len(images)

    runs.seed_everything(ecfg.seed)
    model = LayoutDiffusion(ecfg)
    ema = None
    if ecfg.ema_decay > 0:
        ema = LayoutDiffusion(ecfg)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    sched = make_scheduler(ecfg, "ddpm")
    opt = torch.optim.AdamW(model.parameters(), lr=ecfg.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(ecfg))
    acc = runs.accelerator_for(device)
    model, opt, lr_sched = acc.prepare(model, opt, lr_sched)
    if ema is not None:
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)

    ckpt_root = out_dir / "checkpoints"
    start, history = 0, []
    found = _ckpts(ckpt_root)
    if found:
        start, path = found[-1]
        acc.load_state(str(path))
        history = json.loads((path / "done.json").read_text())["history"]
    bar = runs.progress(total=ecfg.iters, initial=start, desc="pretrain embedded generator",
                        **({} if progress else {"disable": True}))
    model.train()
    t0 = time.perf_counter()
    for step in range(start, ecfg.iters):
        g = torch.Generator().manual_seed(_mix(ecfg.seed, step))
        idx = torch.randint(0, N, (ecfg.batch_size,), generator=g)
        x0 = images[idx]
        flip = torch.rand(ecfg.batch_size, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        lab = torch.where(flip[:, None, None], labels[idx].flip(-1), labels[idx])
        text = torch.stack([cap_emb[int(c)][int(torch.randint(0, len(cap_emb[int(c)]), (1,), generator=g))]
                            for c in cell[idx]])
        drop = torch.rand(ecfg.batch_size, generator=g) < ecfg.caption_dropout
        text[drop] = float("nan")
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, ecfg.num_train_timesteps, (ecfg.batch_size,), generator=g)
        x0, noise, t = x0.to(acc.device), noise.to(acc.device), t.to(acc.device)
        x_t = sched.add_noise(x0, noise, t)
        if ecfg.prediction_type == "epsilon":
            target = noise
        elif ecfg.prediction_type == "sample":
            target = x0
        else:
            target = sched.get_velocity(x0, noise, t)
        with acc.autocast():
            out = model(x_t, t, one_hot_layout(lab.to(acc.device)), text.to(acc.device))
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if ema is not None:
            with torch.no_grad():
                d = min(ecfg.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), acc.unwrap_model(model).parameters()):
                    pe.lerp_(pm.detach(), 1 - d)
        history.append({"iter": step + 1, "loss": float(loss.detach()), "lr": lr_sched.get_last_lr()[0],
                        "sec": time.perf_counter() - t0})
        bar.update(1)
        if (step + 1) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-20:]]):.4f}")
        if ecfg.ckpt_every and (step + 1) % ecfg.ckpt_every == 0 and step + 1 < ecfg.iters:
            _checkpoint(acc, ckpt_root, step + 1, history)
    bar.close()
    final = ema if ema is not None else acc.unwrap_model(model)
    final = final.to("cpu").eval()
    with runs.atomic_path(out_dir / MODEL_FILE) as tmp:
        save_model(final, str(tmp))
    with runs.atomic_write(out_dir / "history.csv", "w") as f:
        pd.DataFrame(history).to_csv(f, index=False)
    runs.atomic_save_json(out_dir / "captions.json", {f"{d}/{c}": list(caps) for (d, c), caps in zip(cells, cell_caps)})
    runs.atomic_save_json(out_dir / "config.json", {"format": "dasslab-zodi-embedded-v1", "key": ecfg.key(),
                                                    "config": ecfg.to_dict(),
                                                    "train_seconds": sum(h["sec"] for h in history[-1:])})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return out_dir


def _checkpoint(acc, ckpt_root: Path, step: int, history: list) -> None:
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    acc.save_state(str(tmp))
    (tmp / "done.json").write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in _ckpts(ckpt_root)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(out_dir: str | Path, ecfg: EmbeddedConfig | None = None) -> bool:
    p = Path(out_dir) / "config.json"
    if not p.is_file() or not (Path(out_dir) / MODEL_FILE).is_file():
        return False
    return ecfg is None or json.loads(p.read_text()).get("key") == ecfg.key()


def cache_dir_for(cache_root: str | Path, ecfg: EmbeddedConfig) -> Path:
    """The folder a generator with these settings lives in: shared by every run that agrees."""
    return Path(cache_root) / f"embedded-{ecfg.key()[:12]}"


def load_model(model_dir: str | Path, device=None) -> tuple[LayoutDiffusion, EmbeddedConfig]:
    from safetensors.torch import load_model as st_load

    model_dir = Path(model_dir)
    if not is_complete(model_dir):
        raise FileNotFoundError(f"{model_dir} holds no finished embedded generator (config.json + {MODEL_FILE}); "
                                "pretrain it first (dasslab.zeroshot.embedded.pretrain, notebook 04)")
    meta = json.loads((model_dir / "config.json").read_text())
    ecfg = EmbeddedConfig.from_dict(meta["config"])
    model = LayoutDiffusion(ecfg)
    st_load(model, str(model_dir / MODEL_FILE), device="cpu")
    dev = runs.pick_device(device)
    return model.to(dev).eval().requires_grad_(False), ecfg


# ------------------------------------------------------------------------------------------ backend
class EmbeddedBackend(TransferBackend):
    """Stochastic inversion + guided DDIM with the pretrained ToyStreets layout-to-image model."""

    name = "embedded"

    def __init__(self, model: LayoutDiffusion, ecfg: EmbeddedConfig, *, encoder: SentenceEncoder | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 3.0, eta: float = 1.0,
                 prompt_suffix: str = "", negative_prompt: str = "", model_dir: str | None = None):
        self.model, self.ecfg = model, ecfg
        self.encoder = encoder or SentenceEncoder()
        self.scheduler = make_scheduler(ecfg, "ddim")
        self.num_inference_steps, self.guidance_scale, self.eta = num_inference_steps, guidance_scale, eta
        self.prompt_suffix, self.negative_prompt = prompt_suffix, negative_prompt
        self.model_dir = model_dir

    @classmethod
    def from_dir(cls, model_dir, device=None, **kwargs) -> EmbeddedBackend:
        model, ecfg = load_model(model_dir, device)
        return cls(model, ecfg, model_dir=str(model_dir), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self) -> dict:
        return {"backend": self.name, "model_dir": self.model_dir, "model_key": self.ecfg.key(),
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "eta": self.eta, "prompt_suffix": self.prompt_suffix, "negative_prompt": self.negative_prompt}

    def _text(self, prompt: str) -> torch.Tensor:
        if not prompt:
            return torch.full((1, TEXT_DIM), float("nan"))
        return self.encoder.encode(prompt)

    @torch.no_grad()
    def transfer(self, images, labels, prompt, strength, generator=None):
        check_batch(images, labels)
        B, _, H, W = images.shape
        dev = self.device
        if (H, W) != self.ecfg.size:
            x0 = F.interpolate(images.float(), size=self.ecfg.size, mode="bilinear", align_corners=False,
                               antialias=True)
            lab = F.interpolate(labels[:, None].float(), size=self.ecfg.size, mode="nearest")[:, 0].long()
        else:
            x0, lab = images.float(), labels
        layout = one_hot_layout(lab.to(dev))
        cond = self._text(prompt + self.prompt_suffix).to(dev).expand(B, -1)
        uncond = self._text(self.negative_prompt).to(dev).expand(B, -1)
        ac = self.scheduler.alphas_cumprod
        ptype = self.ecfg.prediction_type

        def eps_fn(x, t, scale):
            tt = torch.full((x.shape[0],), int(t), device=dev, dtype=torch.long)
            if scale == 1.0:
                return to_epsilon(self.model(x, tt, layout, cond).float(), x, tt.cpu(), ac, ptype)
            xx, ll = torch.cat([x, x]), torch.cat([layout, layout])
            out = self.model(xx, torch.cat([tt, tt]), ll, torch.cat([uncond, cond])).float()
            eps = to_epsilon(out, xx, torch.cat([tt, tt]).cpu(), ac, ptype)
            e_u, e_c = eps.chunk(2)
            return guided(e_u, e_c, scale)

        x = stochastic_inversion_transfer(x0.to(dev), eps_fn, self.scheduler, self.num_inference_steps,
                                          strength, self.guidance_scale, generator=generator, eta=self.eta)
        if (H, W) != self.ecfg.size:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return x.clamp(-1, 1).to(images.device)
