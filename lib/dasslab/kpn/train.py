"""Domain-adversarial training of the DA-KPN and translation of a source set.

One backward pass per step, as in the official code: the kernel predictor and the PatchGAN share one
Adam optimizer, and a gradient-reversal layer between the translation and the discriminator turns
the discriminator's loss into the generator's adversarial loss (the minimax GAN objective):

    L = w_id * MSE(T(x), x) + BCE(D(patch(T(x))), 0) + BCE(D(low(T(x))), 0)
        + BCE(D(patch(y)), 1) + BCE(D(low(y)), 1)

x: source images, y: real target train images, patch: a random full-res crop (default: the low-res
size), low: the whole image downsampled to the low-res size. The official loss has no real
low-res term; without it the discriminator can call every low-res input fake from its scale alone and
the whole-image branch teaches the translator nothing, so ours adds it (``real_whole=False`` gives
the official form). Real and fake inputs of one scale go through the discriminator in one batch, so
its BatchNorm statistics cannot tell them apart by batch.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dasslab import runs
from dasslab.kpn import common, ops
from dasslab.kpn.nets import DAKPN, PatchGAN

METHOD = "kpn"
NOTEBOOK = "05_kpn_baseline"


@dataclass
class KPNConfig:
    """Settings of one DA-KPN training (the ``kpn_*`` keys of a profile's ``05_kpn_baseline`` table)."""

    iters: int = 500
    batch_size: int = 8
    lr: float = 1e-4                      # official Adam lr
    betas: tuple[float, float] = (0.9, 0.999)
    identity_weight: float = 1.0
    grl_lambda: float = 1.0
    lowres: tuple[int, int] | None = None  # segmenter input / parameter grid; None: image size // 2
    patch: tuple[int, int] | None = None   # full-res discriminator crop; None: the low-res size
    kernel_size: int = 7                   # 25 at paper scale
    sigma_min: float = 0.5
    hidden: int = 0                        # 0: the official single 1x1 conv; >0: deeper KPN
    ndf: int = 64
    n_layers: int = 3
    real_whole: bool = True
    noise_seed: int = 0
    seed: int = 0
    amp: bool = True
    ckpt_every: int = 0                    # 0: only the final checkpoint
    keep_ckpts: int = 2

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"KPNConfig: iters and batch_size must be >= 1, got {self.iters}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"KPNConfig: lr must be > 0, got {self.lr}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"KPNConfig: kernel_size must be odd, got {self.kernel_size}")
        for name in ("lowres", "patch"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(int(t) for t in v)
                if len(v) != 2 or min(v) < 1:
                    raise ValueError(f"KPNConfig.{name} must be (H, W), got {getattr(self, name)}")
                setattr(self, name, v)
        self.betas = tuple(float(b) for b in self.betas)

    def resolved(self, image_size) -> KPNConfig:
        """A copy with lowres / patch filled in for this image size."""
        H, W = int(image_size[0]), int(image_size[1])
        low = self.lowres or (max(1, H // 2), max(1, W // 2))
        return dataclasses.replace(self, lowres=low, patch=self.patch or low)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("lowres", "patch", "betas"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    def identity(self) -> dict:
        """The fields that change the trained weights (not checkpoint bookkeeping)."""
        d = self.to_dict()
        for k in ("ckpt_every", "keep_ckpts"):
            d.pop(k)
        return d


def build_model(segmenter: nn.Module, image_size, cfg: KPNConfig, num_classes: int | None = None) -> DAKPN:
    cfg = cfg.resolved(image_size)
    num_classes = num_classes or getattr(segmenter, "seg_config", {}).get("num_classes", 19)
    return DAKPN(segmenter, image_size, cfg.lowres, num_classes=num_classes, hidden=cfg.hidden,
                 kernel_size=cfg.kernel_size, sigma_min=cfg.sigma_min, noise_seed=cfg.noise_seed)


def _discriminator(cfg: KPNConfig) -> PatchGAN:
    d = PatchGAN(3, cfg.ndf, cfg.n_layers, norm="batch")
    need = d.min_size()
    for name, hw in (("patch", cfg.patch), ("lowres", cfg.lowres)):
        if min(hw) < need:
            raise ValueError(f"KPNConfig.{name}={tuple(hw)} is too small for a {cfg.n_layers}-layer PatchGAN "
                             f"(needs >= {need} px per side): lower n_layers or enlarge {name}")
    return d


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def train_kpn(segmenter: nn.Module, source, target, cfg: KPNConfig, out_dir=None, device=None,
              resume: bool = True, fingerprint_extra=None,
              desc: str = "train DA-KPN") -> tuple[DAKPN, pd.DataFrame]:
    """Trains the kernel predictor (and its discriminator); returns ``(model, history)``.

    ``source`` / ``target``: datasets of items with ``"image"`` in [-1,1] (target = real target *train*
    images). With ``out_dir``: checkpoints ``out_dir/checkpoints/step_*`` (kpn + disc safetensors and
    ``state.pt``), ``history.csv`` and the final ``kpn.safetensors`` + ``config.json``; with ``resume``
    the newest checkpoint is continued (and a finished run returns at once). A checkpoint made with
    another config, another segmenter (weights hash) or another ``fingerprint_extra`` (e.g. the
    training sets' fingerprints) is refused rather than silently continued.
    """
    src_bank = common.ImageBank(source, what="source dataset")
    tgt_bank = common.ImageBank(target, what="target dataset")
    image_size = src_bank.shape[-2:]
    if tgt_bank.shape[-2:] != image_size:
        raise ValueError(f"source images are {tuple(image_size)} but target images are {tuple(tgt_bank.shape[-2:])}; "
                         "load both at one size (SegFolder size=...)")
    cfg = cfg.resolved(image_size)
    ident = {**cfg.identity(), "segmenter": common.weights_digest(segmenter), "extra": fingerprint_extra}
    model = build_model(segmenter, image_size, cfg)
    disc = _discriminator(cfg)
    if cfg.patch[0] > image_size[0] or cfg.patch[1] > image_size[1]:
        raise ValueError(f"KPNConfig.patch={cfg.patch} exceeds the image size {tuple(image_size)}")
    device = runs.pick_device(device)
    out_dir = Path(out_dir) if out_dir is not None else None

    start, history, state = 0, [], None
    if out_dir is not None and resume:
        found = common.checkpoints(out_dir)
        if found:
            start, path = found[-1]
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            common.identity_mismatch(state.get("cfg_identity"), runs.to_jsonable(ident), out_dir)
            model.load_trainable_state_dict(common.load_tensors(path, "kpn"))
            disc.load_state_dict(common.load_tensors(path, "disc"))
            history = list(state["history"])
    if start >= cfg.iters:
        model.to(device).eval()
        return model, pd.DataFrame(history)

    runs.seed_everything(cfg.seed)
    acc = runs.accelerator_for(device, cfg.amp)
    model.to(acc.device)
    disc.to(acc.device)
    opt = torch.optim.Adam(list(model.predictor.parameters()) + list(disc.parameters()), lr=cfg.lr, betas=cfg.betas)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    model, disc, opt = acc.prepare(model, disc, opt)
    if state is not None:
        runs.restore_loop_state(acc, state)
    raw = acc.unwrap_model(model)
    identity = torch.tensor(ops.IDENTITY, device=acc.device).view(1, -1, 1, 1)

    bar = runs.progress(total=cfg.iters, initial=start, desc=desc, **({} if acc.is_main_process else {"disable": True}))
    model.train()
    disc.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.iters):
        rng = common.step_rng(cfg.seed, step, acc.process_index)
        src = src_bank.batch(common.draw_indices(len(src_bank), cfg.batch_size, rng)).to(acc.device)
        tgt = tgt_bank.batch(common.draw_indices(len(tgt_bank), cfg.batch_size, rng)).to(acc.device)
        logits = raw.logits(src)
        with acc.autocast():
            fake = model(src, logits)
            mse = F.mse_loss((fake.float() + 1) / 2, (src + 1) / 2)
            rev = ops.grad_reverse(fake, cfg.grl_lambda)
            n = len(src)
            d_patch = disc(torch.cat([common.random_crops(rev, cfg.patch, rng), common.random_crops(tgt, cfg.patch, rng)]))
            low = lambda t: F.interpolate(t, size=cfg.lowres, mode="bilinear", align_corners=False, antialias=True)
            whole_in = torch.cat([low(rev), low(tgt)]) if cfg.real_whole else low(rev)
            d_whole = disc(whole_in)
            terms = {"d_fake_patch": _bce(d_patch[:n], 0.0), "d_real_patch": _bce(d_patch[n:], 1.0),
                     "d_fake_whole": _bce(d_whole[:n], 0.0)}
            if cfg.real_whole:
                terms["d_real_whole"] = _bce(d_whole[n:], 1.0)
            loss = cfg.identity_weight * mse + sum(terms.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        with torch.no_grad():
            p_fake = torch.sigmoid(torch.cat([d_patch[:n].flatten(), d_whole[:n].flatten()]).float()).mean()
            p_real = torch.sigmoid(d_patch[n:].float()).mean()
            dev = (raw.predictor(logits) - identity).abs().mean(dim=(0, 2, 3))
        row = {"iter": step + 1, "loss": float(loss.detach()), "mse": float(mse.detach()),
               **{k: float(v.detach()) for k, v in terms.items()},
               "D(fake)": float(p_fake), "D(real)": float(p_real),
               "dev_colour": float(dev[:6].mean()), "dev_sigma": float(dev[6:9].mean()),
               "dev_noise": float(dev[9:].mean()), "sec": time.perf_counter() - t0}
        history.append(row)
        bar.update(1)
        if (step + 1) % 10 == 0:
            bar.set_postfix(mse=f"{row['mse']:.4f}", Dfake=f"{row['D(fake)']:.2f}")
        done = step + 1 == cfg.iters
        if out_dir is not None and acc.is_main_process and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            st = {"step": step + 1, "optimizer": opt.state_dict(), "history": history,
                  "cfg_identity": runs.to_jsonable(ident),
                  **runs.loop_state(acc)}
            common.save_checkpoint(out_dir, step + 1, {"kpn": raw.trainable_state_dict(),
                                                       "disc": acc.unwrap_model(disc).state_dict()}, st, cfg.keep_ckpts)
    bar.close()
    acc.wait_for_everyone()
    raw.eval()
    if out_dir is not None and acc.is_main_process:
        common.write_history(out_dir, history)
        save_kpn(raw, out_dir, cfg)
    return raw, pd.DataFrame(history)


def save_kpn(model: DAKPN, out_dir, cfg: KPNConfig | None = None) -> Path:
    """``kpn.safetensors`` (predictor + noise map) and ``config.json`` (model and training settings)."""
    out_dir = Path(out_dir)
    common.save_tensors(out_dir / "kpn.safetensors", model.trainable_state_dict())
    meta = {"model": model.config, "train": cfg.to_dict() if cfg else None,
            "segmenter": getattr(model.segmenter, "seg_config", None)}
    runs.atomic_save_json(out_dir / "config.json", meta)
    return out_dir


def load_kpn(out_dir, segmenter: nn.Module, device=None) -> DAKPN:
    """Rebuilds a saved DA-KPN around ``segmenter`` (the frozen source segmenter it was trained with)."""
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: train the DA-KPN first (dasslab kpn-train)")
    mc = json.loads(cfg_path.read_text())["model"]
    model = DAKPN(segmenter, mc["image_size"], mc["lowres"], num_classes=mc["num_classes"], hidden=mc["hidden"],
                  kernel_size=mc["kernel_size"], sigma_min=mc["sigma_min"], sigma_max=mc["sigma_max"],
                  noise_seed=mc["noise_seed"])
    model.load_trainable_state_dict(common.load_tensors(out_dir, "kpn"))
    device = runs.pick_device(device)
    return model.to(device).eval()


read_history = common.read_history  # the training curve (history.csv) of a finished run


def translate_dataset(model: DAKPN, dataset, out_dir, batch_size: int = 16, device=None, params: dict | None = None,
                      method: str = METHOD) -> dict:
    """Translates every image of ``dataset`` and writes the set (GTA5 layout, source labels) into
    ``out_dir`` with ``translation.json`` (method, params, seconds per image)."""
    device = runs.pick_device(device)
    model = model.to(device).eval()
    meta = dict(params or {})
    meta.setdefault("model", model.config)
    return common.translate_to_folder(lambda x: model(x), dataset, out_dir, method, meta, batch_size, device,
                                      desc="translate DA-KPN")


def parameter_maps(model: DAKPN, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 predicted full-res parameter maps ``{name: (B,H,W)}`` for ``images`` (B,3,H,W) in [-1,1]."""
    dev = next(model.predictor.parameters()).device
    return model.parameter_maps(images.to(dev))
