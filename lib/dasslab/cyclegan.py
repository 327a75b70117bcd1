"""CycleGAN (Zhu et al., ICCV 2017): the unpaired GAN translator both papers compare against.

Two ResNet generators (source -> target, target -> source), two PatchGAN discriminators with
InstanceNorm, least-squares GAN losses, cycle-consistency (weight 10) and identity (weight 5) L1
losses, a history pool of 50 generated images per discriminator, Adam 2e-4 with betas (0.5, 0.999),
constant learning rate for the first half and a linear decay to zero in the second (as the official
code's 100 + 100 epochs). Nothing ties a generated pixel to its source pixel except the cycle loss,
so a generator is free to move content across class borders: that is the failure a KPN rules out.

Exact resume: batches, crops and pool draws of step ``s`` come from ``(seed, s)``, and a checkpoint
holds the four networks, both optimizers, schedulers, the pools and the RNG states.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dasslab import runs
from dasslab.kpn import common
from dasslab.kpn.nets import PatchGAN

METHOD = "cyclegan"
NOTEBOOK = "05_kpn_baseline"


# --------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, ``n_down`` stride-2 convs, ``n_blocks`` residual blocks, as many transposed convs,
    c7s1-3, tanh. Inputs whose sides are not multiples of 2**n_down are reflect-padded and cropped."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, n_down: int = 2):
        super().__init__()
        if ngf < 1 or n_blocks < 0 or n_down < 0:
            raise ValueError(f"ResnetGenerator: bad sizes ngf={ngf}, n_blocks={n_blocks}, n_down={n_down}")
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        ch = ngf
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 3, 2, 1), nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResBlock(ch) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(ch // 2),
                       nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.n_down = n_down
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResnetGenerator expects (B,3,H,W) images in [-1,1], got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        m = 2 ** self.n_down
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return self.net(x)[..., :H, :W]


class ImagePool:
    """Shrivastava et al.'s history of generated images: the discriminator sees old fakes too."""

    def __init__(self, size: int = 50):
        self.size = int(size)
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.cpu())
                out.append(img)
            elif rng.random() > 0.5:
                j = int(rng.integers(0, self.size))
                old = self.images[j].to(img.device)
                self.images[j] = img.cpu()
                out.append(old)
            else:
                out.append(img)
        return torch.cat(out)

    def state(self) -> torch.Tensor | None:
        return torch.cat(self.images) if self.images else None

    def load(self, t: torch.Tensor | None) -> None:
        self.images = [] if t is None else [t[i:i + 1] for i in range(len(t))]


class CycleGAN(nn.Module):
    """The four networks; ``forward`` is the source -> target generator (what translation uses)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, n_down: int = 2, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        self.g_st = ResnetGenerator(ngf, n_blocks, n_down)   # source -> target
        self.g_ts = ResnetGenerator(ngf, n_blocks, n_down)   # target -> source
        self.d_t = PatchGAN(3, ndf, n_layers, norm="instance")  # real target vs g_st(source)
        self.d_s = PatchGAN(3, ndf, n_layers, norm="instance")  # real source vs g_ts(target)
        self.config = {"ngf": ngf, "n_blocks": n_blocks, "n_down": n_down, "ndf": ndf, "n_layers": n_layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_st(x)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
@dataclass
class CycleGANConfig:
    """Settings of one CycleGAN training (the ``cyclegan_*`` keys of a profile's 05 table)."""

    iters: int = 1000
    batch_size: int = 1                   # official: 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_cycle: float = 10.0
    lambda_identity: float = 5.0          # official: 0.5 x lambda_cycle
    ngf: int = 64
    n_blocks: int = 9
    n_down: int = 2
    ndf: int = 64
    n_layers: int = 3
    pool_size: int = 50
    crop: tuple[int, int] | None = None   # random training crop (official 256x256); None: whole images
    decay_from: float = 0.5               # fraction of iters after which the lr decays linearly to 0
    seed: int = 0
    amp: bool = True
    ckpt_every: int = 0
    keep_ckpts: int = 2

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"CycleGANConfig: iters and batch_size must be >= 1, got {self.iters}, {self.batch_size}")
        if not 0.0 <= self.decay_from <= 1.0:
            raise ValueError(f"CycleGANConfig.decay_from must be in [0, 1], got {self.decay_from}")
        if self.crop is not None:
            self.crop = tuple(int(c) for c in self.crop)
            if len(self.crop) != 2:
                raise ValueError(f"CycleGANConfig.crop must be (H, W), got {self.crop}")
        self.betas = tuple(float(b) for b in self.betas)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        d["betas"] = list(self.betas)
        return d

    def identity(self) -> dict:
        d = self.to_dict()
        for k in ("ckpt_every", "keep_ckpts"):
            d.pop(k)
        return d

    def build(self) -> CycleGAN:
        return CycleGAN(self.ngf, self.n_blocks, self.n_down, self.ndf, self.n_layers)


def _lr_factor(cfg: CycleGANConfig):
    start = int(cfg.decay_from * cfg.iters)

    def f(step: int) -> float:
        if step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / max(1, cfg.iters - start))
    return f


def _mse_to(pred: torch.Tensor, target: float) -> torch.Tensor:
    return F.mse_loss(pred.float(), torch.full_like(pred.float(), target))


def train_cyclegan(source, target, cfg: CycleGANConfig, out_dir=None, device=None, resume: bool = True,
                   fingerprint_extra=None, desc: str = "train CycleGAN") -> tuple[CycleGAN, pd.DataFrame]:
    """Trains CycleGAN between ``source`` and ``target`` (datasets of items with ``"image"`` in [-1,1]);
    returns ``(model, history)``. Checkpoints go to ``out_dir/checkpoints/step_*``, the final generator
    to ``out_dir/generator.safetensors`` + ``config.json``; ``resume`` continues the newest checkpoint."""
    src_bank = common.ImageBank(source, what="source dataset")
    tgt_bank = common.ImageBank(target, what="target dataset")
    if cfg.crop is not None:
        for bank, what in ((src_bank, "source"), (tgt_bank, "target")):
            if cfg.crop[0] > bank.shape[-2] or cfg.crop[1] > bank.shape[-1]:
                raise ValueError(f"CycleGANConfig.crop={cfg.crop} exceeds the {what} image size {bank.shape[-2:]}")
    model = cfg.build()
    side = min(cfg.crop) if cfg.crop else min(*src_bank.shape[-2:], *tgt_bank.shape[-2:])
    if side < model.d_t.min_size():
        raise ValueError(f"images (or crops) of side {side} are too small for a {cfg.n_layers}-layer PatchGAN "
                         f"(needs >= {model.d_t.min_size()}): lower CycleGANConfig.n_layers")
    device = runs.pick_device(device)
    out_dir = Path(out_dir) if out_dir is not None else None
    ident = runs.to_jsonable({**cfg.identity(), "extra": fingerprint_extra})
    pools = {"t": ImagePool(cfg.pool_size), "s": ImagePool(cfg.pool_size)}

    start, history, state = 0, [], None
    if out_dir is not None and resume:
        found = common.checkpoints(out_dir)
        if found:
            start, path = found[-1]
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            common.identity_mismatch(state.get("cfg_identity"), ident, out_dir)
            model.load_state_dict(common.load_tensors(path, "cyclegan"))
            history = list(state["history"])
            for k, p in pools.items():
                p.load(state["pools"][k])
    if start >= cfg.iters:
        return model.to(device).eval(), pd.DataFrame(history)

    runs.seed_everything(cfg.seed)
    acc = runs.accelerator_for(device, cfg.amp)
    model.to(acc.device)
    gens = list(model.g_st.parameters()) + list(model.g_ts.parameters())
    discs = list(model.d_t.parameters()) + list(model.d_s.parameters())
    opt_g = torch.optim.Adam(gens, lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(discs, lr=cfg.lr, betas=cfg.betas)
    sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_factor(cfg))
    sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_factor(cfg))
    if state is not None:
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sch_g.load_state_dict(state["sch_g"])
        sch_d.load_state_dict(state["sch_d"])
    g_st, g_ts, d_t, d_s, opt_g, opt_d = acc.prepare(model.g_st, model.g_ts, model.d_t, model.d_s, opt_g, opt_d)
    if state is not None:
        runs.restore_loop_state(acc, state)

    bar = runs.progress(total=cfg.iters, initial=start, desc=desc, **({} if acc.is_main_process else {"disable": True}))
    model.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.iters):
        rng = common.step_rng(cfg.seed, step, acc.process_index)
        a = src_bank.batch(common.draw_indices(len(src_bank), cfg.batch_size, rng))
        b = tgt_bank.batch(common.draw_indices(len(tgt_bank), cfg.batch_size, rng))
        if cfg.crop is not None:
            a, b = common.random_crops(a, cfg.crop, rng), common.random_crops(b, cfg.crop, rng)
        a, b = a.to(acc.device), b.to(acc.device)

        # generators (discriminators fixed)
        for p in discs:
            p.requires_grad_(False)
        with acc.autocast():
            fake_b, fake_a = g_st(a), g_ts(b)
            rec_a, rec_b = g_ts(fake_b), g_st(fake_a)
            g_gan = _mse_to(d_t(fake_b), 1.0) + _mse_to(d_s(fake_a), 1.0)
            g_cyc = F.l1_loss(rec_a.float(), a) + F.l1_loss(rec_b.float(), b)
            g_idt = (F.l1_loss(g_st(b).float(), b) + F.l1_loss(g_ts(a).float(), a)) if cfg.lambda_identity else torch.zeros((), device=a.device)
            loss_g = g_gan + cfg.lambda_cycle * g_cyc + cfg.lambda_identity * g_idt
        if not torch.isfinite(loss_g):
            raise FloatingPointError(f"{desc}: generator loss is {loss_g.item()} at step {step}")
        opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        opt_g.step()
        for p in discs:
            p.requires_grad_(True)

        # discriminators, on pooled fakes
        pb = pools["t"].query(fake_b.detach().float(), rng)
        pa = pools["s"].query(fake_a.detach().float(), rng)
        with acc.autocast():
            d_t_loss = 0.5 * (_mse_to(d_t(b), 1.0) + _mse_to(d_t(pb), 0.0))
            d_s_loss = 0.5 * (_mse_to(d_s(a), 1.0) + _mse_to(d_s(pa), 0.0))
            loss_d = d_t_loss + d_s_loss
        opt_d.zero_grad(set_to_none=True)
        acc.backward(loss_d)
        opt_d.step()
        sch_g.step()
        sch_d.step()

        row = {"iter": step + 1, "loss_g": float(loss_g.detach()), "g_gan": float(g_gan.detach()),
               "g_cycle": float(g_cyc.detach()), "g_identity": float(g_idt.detach()),
               "d_target": float(d_t_loss.detach()), "d_source": float(d_s_loss.detach()),
               "lr": opt_g.param_groups[0]["lr"], "sec": time.perf_counter() - t0}
        history.append(row)
        bar.update(1)
        if (step + 1) % 10 == 0:
            bar.set_postfix(cyc=f"{row['g_cycle']:.3f}", D=f"{row['d_target']:.3f}")
        done = step + 1 == cfg.iters
        if out_dir is not None and acc.is_main_process and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            st = {"step": step + 1, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                  "sch_g": sch_g.state_dict(), "sch_d": sch_d.state_dict(),
                  "pools": {k: p.state() for k, p in pools.items()}, "history": history, "cfg_identity": ident,
                  **runs.loop_state(acc)}
            common.save_checkpoint(out_dir, step + 1, {"cyclegan": model.state_dict()}, st, cfg.keep_ckpts)
    bar.close()
    acc.wait_for_everyone()
    model.eval()
    if out_dir is not None and acc.is_main_process:
        common.write_history(out_dir, history)
        save_generator(model, out_dir, cfg)
    return model, pd.DataFrame(history)


def save_generator(model: CycleGAN, out_dir, cfg: CycleGANConfig | None = None) -> Path:
    """The source -> target generator (what translation needs) and the config."""
    out_dir = Path(out_dir)
    common.save_tensors(out_dir / "generator.safetensors", model.g_st.state_dict())
    runs.atomic_save_json(out_dir / "config.json", {"model": model.config, "train": cfg.to_dict() if cfg else None})
    return out_dir


def load_generator(out_dir, device=None) -> ResnetGenerator:
    out_dir = Path(out_dir)
    p = out_dir / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: train CycleGAN first (dasslab cyclegan-train)")
    mc = json.loads(p.read_text())["model"]
    g = ResnetGenerator(mc["ngf"], mc["n_blocks"], mc["n_down"])
    g.load_state_dict(common.load_tensors(out_dir, "generator"))
    device = runs.pick_device(device)
    return g.to(device).eval()


read_history = common.read_history  # the training curve (history.csv) of a finished run


def translate_dataset(generator: nn.Module, dataset, out_dir, batch_size: int = 16, device=None,
                      params: dict | None = None, method: str = METHOD) -> dict:
    """Translates every image of ``dataset`` with the source -> target generator and writes the set
    (GTA5 layout, source labels) plus ``translation.json`` into ``out_dir``."""
    device = runs.pick_device(device)
    generator = generator.to(device).eval()
    return common.translate_to_folder(lambda x: generator(x), dataset, out_dir, method, dict(params or {}),
                                      batch_size, device, desc="translate CycleGAN")


# --------------------------------------------------------------------------------------------------
# from a profile
# --------------------------------------------------------------------------------------------------
PROFILE_KEYS = {
    "cyclegan_iters": "iters", "cyclegan_batch_size": "batch_size", "cyclegan_lr": "lr", "cyclegan_ngf": "ngf",
    "cyclegan_blocks": "n_blocks", "cyclegan_ndf": "ndf", "cyclegan_disc_layers": "n_layers",
    "cyclegan_crop": "crop",
}


def cyclegan_config(cfg) -> CycleGANConfig:
    """The CycleGANConfig of the notebook table ``cfg.nb`` (keys ``cyclegan_*``; empty crop = whole images)."""
    kw = {}
    for key, field in PROFILE_KEYS.items():
        if key in cfg.nb:
            v = cfg.nb[key]
            kw[field] = (list(v) or None) if field == "crop" else v
    kw["seed"] = int(cfg.nb.get("cyclegan_seed", 0))
    return CycleGANConfig(**kw)


def run(cfg, rd=None, sets=None, resume: bool = True, translate: bool = True) -> dict:
    """Train (or resume, or load) CycleGAN for ``cfg`` and translate ``source_train`` into
    ``rd.translated("cyclegan")`` (skipped when the set there was made with the same settings).
    Checkpoints made with other settings are discarded and CycleGAN is trained afresh."""
    from dasslab import datasets, seg

    rd = rd or runs.RunDir(cfg.run_dir)
    sets = sets or datasets.benchmark_sets(cfg)
    device = runs.pick_device(cfg.get("device", "auto"))
    ccfg = cyclegan_config(cfg)
    fps = {k: seg.dataset_fingerprint(sets[k]) for k in ("source_train", "target_train")}
    out_dir = rd.artifacts / METHOD
    t0 = time.perf_counter()
    kw = {"out_dir": out_dir, "device": device, "fingerprint_extra": fps}
    try:
        model, history = train_cyclegan(sets["source_train"], sets["target_train"], ccfg, resume=resume, **kw)
    except common.StaleCheckpoint as e:  # other settings or data: train afresh
        print(f"CycleGAN: retraining ({e})")
        common.clear_checkpoints(out_dir)
        model, history = train_cyclegan(sets["source_train"], sets["target_train"], ccfg, resume=False, **kw)
    train_seconds = time.perf_counter() - t0
    meta = None
    if translate:
        params = {"train": ccfg.identity(), "generator": common.weights_digest(model.g_st), "source": fps["source_train"]}
        out = rd.translated(METHOD)
        if common.translation_is_current(out, params, len(sets["source_train"])):
            meta = json.loads((out / "translation.json").read_text())
        else:
            meta = translate_dataset(model.g_st, sets["source_train"], out, device=device, params=params)
    return {"model": model, "history": history, "translation": meta, "out_dir": out_dir, "config": ccfg,
            "train_seconds": train_seconds}


def register(subparsers) -> None:
    p = subparsers.add_parser("cyclegan-train", help="train the CycleGAN baseline and write its translated source set")
    p.add_argument("--profile", default="demo")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<profile>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=None, help="override cyclegan_iters of the profile")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing checkpoints")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = runs.load_config(args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device)
    if args.iters is not None:
        cfg.nb["cyclegan_iters"] = args.iters
    runs.set_threads()
    res = run(cfg, resume=not args.no_resume)
    t = res["translation"]
    print(f"CycleGAN: {len(res['history'])} steps in {res['out_dir']}; translated {t['n_images']} images "
          f"({t['seconds_per_image'] * 1e3:.2f} ms/image) into {runs.RunDir(cfg.run_dir).translated(METHOD)}")
    return 0
