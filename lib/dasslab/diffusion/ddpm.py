"""The target-domain DDPM: an unconditional diffusion model trained on target images only.

It is the translator of Peng et al. (and of SDEdit): a source image noised to step n and denoised by
this model comes out in the target style. Training reads only the ``image`` of each item; a
:class:`~dasslab.datasets.SegFolder` is reopened with ``with_labels=False`` so target labels are never
even read.

diffusers ``UNet2DModel`` + ``DDPMScheduler`` (epsilon prediction, linear betas, T = 1000), EMA of the
weights (diffusers ``EMAModel`` with warm-up), gradient clipping, Accelerate (mixed precision only on
CUDA; several GPUs with ``accelerate launch -m dasslab train-ddpm ...``). Checkpoints land every
``ckpt_every`` steps in ``<out>-checkpoints/<fingerprint>/step_*`` (UNet, EMA UNet and scheduler via
``save_pretrained`` plus optimizer / RNG / loss history in ``state.pt``, written to a temp folder and
renamed) and training resumes from the newest. The learning rate is constant after warm-up, so the
number of steps is not part of the fingerprint: asking for more steps continues an earlier run.
The result is ``DDPMPipeline(unet=<EMA UNet>, scheduler).save_pretrained(out)``; :func:`load_ddpm`
reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dasslab import runs

CKPT_PREFIX = "step_"
META_NAME = "dasslab_ddpm.json"
NOTEBOOK = "01_target_diffusion"

#: UNet2DModel settings per size preset. "tiny" (0.16 M parameters) is for tests. "demo" (1.1 M) is
#: for 32x64 on a CPU: three levels, attention only at 8x16; it beat a cheaper four-level
#: (16, 32, 64, 64) variant at equal CPU time. "paper" (120 M) is our choice for Cityscapes at 256x512
#: (Peng et al. do not publish theirs): a guided-diffusion (ADM) style UNet, channel multipliers
#: (1,1,2,2,4,4) on 128 base channels, two residual blocks per level, attention at 32x64, 16x32, 8x16.
SIZE_PRESETS: dict[str, dict] = {
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")},
    "demo": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
             "attention_head_dim": 32,
             "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
             "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")},
    "paper": {"block_out_channels": (128, 128, 256, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
              "attention_head_dim": 64, "dropout": 0.1,
              "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                   "AttnDownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D",
                                 "UpBlock2D", "UpBlock2D")},
}


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class DDPMTrainConfig:
    """One DDPM training run. ``batch_size`` is the global batch (split over processes)."""

    size: str = "demo"                  # SIZE_PRESETS key
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999           # upper bound; EMA warm-up 1 - (1 + step)^-ema_power below it
    ema_power: float = 0.75
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"      # or "squaredcos_cap_v2" (cosine, Nichol & Dhariwal)
    snr_gamma: float | None = None      # Min-SNR loss weighting (Hang et al. 2023); None = plain MSE
    flip: bool = True                   # random horizontal flips
    seed: int = 0
    amp: bool = True                    # mixed precision, CUDA only
    ckpt_every: int = 500
    keep_ckpts: int = 2
    num_workers: int = 0

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def __post_init__(self):
        if self.size not in SIZE_PRESETS:
            raise ValueError(f"ddpm_size={self.size!r} unknown; presets: {', '.join(SIZE_PRESETS)}")
        for k in ("steps", "batch_size", "num_train_timesteps"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"DDPM {k}={getattr(self, k)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"DDPM lr={self.lr} must be > 0")

    def identity(self) -> dict:
        """What changes the trajectory (not ``steps``, ``ckpt_every``, ``keep_ckpts``, ``num_workers``)."""
        d = dataclasses.asdict(self)
        for k in ("steps", "ckpt_every", "keep_ckpts", "num_workers"):
            d.pop(k)
        return d


#: keys of the notebook table that feed DDPMTrainConfig (profile key -> field)
PROFILE_KEYS = {"ddpm_size": "size", "ddpm_steps": "steps", "ddpm_batch_size": "batch_size", "ddpm_lr": "lr",
                "ddpm_warmup": "warmup", "ddpm_ema_decay": "ema_decay", "ddpm_grad_clip": "grad_clip",
                "ddpm_ckpt_every": "ckpt_every", "ddpm_timesteps": "num_train_timesteps",
                "ddpm_beta_schedule": "beta_schedule", "ddpm_seed": "seed", "ddpm_flip": "flip",
                "ddpm_snr_gamma": "snr_gamma"}


def train_config(cfg, **overrides) -> DDPMTrainConfig:
    """The DDPMTrainConfig of a profile's ``["01_target_diffusion"]`` table (``ddpm_*`` keys)."""
    nb = cfg.nb if cfg.get("notebook") == NOTEBOOK else cfg.get(NOTEBOOK, {})
    kw = {field: nb[key] for key, field in PROFILE_KEYS.items() if key in nb and nb[key] is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return DDPMTrainConfig(**kw)


def resolution(cfg) -> tuple[int, int]:
    """(H, W) of the DDPM and of the translated sets: ``ddpm_resolution``, or the profile's data.size."""
    nb = cfg.nb if cfg.get("notebook") == NOTEBOOK else cfg.get(NOTEBOOK, {})
    res = nb.get("ddpm_resolution") or cfg.data.get("size")
    if not res or len(res) != 2:
        raise ValueError(f"ddpm_resolution / data.size must be [H, W], got {res!r}")
    return int(res[0]), int(res[1])


def build_unet(preset_or_cfg="demo", sample_size=None):
    """A fresh ``UNet2DModel`` from a size preset, or from a run config (``ddpm_size`` and
    ``data.size``). ``sample_size`` (H, W) must be divisible by 2^(levels - 1)."""
    from diffusers import UNet2DModel

    if isinstance(preset_or_cfg, str):
        preset = preset_or_cfg
    else:
        preset = train_config(preset_or_cfg).size
        sample_size = sample_size or resolution(preset_or_cfg)
    if preset not in SIZE_PRESETS:
        raise ValueError(f"ddpm_size={preset!r} unknown; presets: {', '.join(SIZE_PRESETS)}")
    if sample_size is None:
        raise ValueError("build_unet needs sample_size=(H, W)")
    kw = dict(SIZE_PRESETS[preset])
    h, w = int(sample_size[0]), int(sample_size[1])
    f = 2 ** (len(kw["block_out_channels"]) - 1)
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not divisible by {f}, as the {preset!r} UNet needs")
    return UNet2DModel(sample_size=(h, w), in_channels=3, out_channels=3, **kw)


def build_scheduler(tc: DDPMTrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=tc.num_train_timesteps, beta_schedule=tc.beta_schedule,
                         prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """Only the images of a dataset (dict items, tensors or a (N,3,H,W) tensor)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        x = item["image"] if isinstance(item, dict) else item
        return torch.as_tensor(x, dtype=torch.float32)


def images_only(ds):
    """A dataset that yields only images; a SegFolder is reopened without its labels."""
    from dasslab import datasets

    if isinstance(ds, datasets.SegFolder) and ds.with_labels:
        entries = [dataclasses.replace(e, label=None, kind=None) for e in ds.entries]
        ds = datasets.SegFolder(ds.root, ds.preset, ds.split, ds.condition, ds.size, with_labels=False,
                                cache=ds.cache, entries=entries)
    return _Images(ds)


def _data_fingerprint(ds) -> dict:
    fp = getattr(ds, "fingerprint", None)
    if callable(fp):
        out = dict(fp())
        out.pop("mtime", None)
        return out
    if isinstance(ds, torch.Tensor):
        return {"tensor": hashlib.sha1(ds.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
    return {"type": type(ds).__name__, "len": len(ds)}


class _StepBatches(torch.utils.data.Sampler):
    """Batch indices drawn from a generator seeded by (seed, step): resuming at step k replays the
    uninterrupted run exactly, with no sampler state to store. Each process takes its slice."""

    def __init__(self, n: int, batch: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.stop, self.rank, self.world = n, batch, seed, start, stop, rank, world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            rng = np.random.default_rng([self.seed, step])
            idx = rng.choice(self.n, self.batch, replace=self.batch > self.n)
            per = self.batch // self.world
            yield idx[self.rank * per:(self.rank + 1) * per].tolist()


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))


def ddpm_loss(unet, scheduler, x0: torch.Tensor, generator: torch.Generator | None = None,
              snr_gamma: float | None = None) -> torch.Tensor:
    """The simple DDPM objective: || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2
    with t uniform in [0, T). ``snr_gamma``: Min-SNR weighting min(SNR_t, gamma) / SNR_t per image,
    which stops the many easy low-noise steps from dominating and speeds up training."""
    from .sampling import noise_to, randn

    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    xt = noise_to(scheduler, x0, t, noise=noise)
    pred = unet(xt, t).sample
    per_image = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma:
        ac = scheduler.alphas_cumprod.to(x0.device)[t]
        snr = ac / (1 - ac)
        per_image = per_image * snr.clamp(max=float(snr_gamma)) / snr
    return per_image.mean()


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoint_root(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + "-checkpoints")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in the DDPM's checkpoint folder, oldest first."""
    from dasslab import checkpoints

    return checkpoints.step_folders(ckpt_dir)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished temp folder at ``final`` (the old one, if any, removed only after)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ckpt_dir: Path, step: int, unet, ema, scheduler, state: dict, keep: int = 2) -> Path:
    """UNet, EMA and scheduler via save_pretrained + ``state.pt``, into a temp folder renamed at the end."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{CKPT_PREFIX}{step:07d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(tmp / "unet")
        ema.save_pretrained(tmp / "unet_ema")
        scheduler.save_pretrained(tmp / "scheduler")
        torch.save(state, tmp / "state.pt")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    older = [p for s, p in list_checkpoints(ckpt_dir) if s < step]
    for old in older[:max(0, len(older) - (max(1, keep) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_ema(path: Path):
    """EMAModel.from_pretrained without its deprecated config-from-path call."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    conf = UNet2DModel.load_config(path)
    ema_state = {k: conf[k] for k in ("decay", "min_decay", "optimization_step", "update_after_step",
                                      "use_ema_warmup", "inv_gamma", "power") if k in conf}
    model = UNet2DModel.from_pretrained(path)
    ema = EMAModel(model.parameters(), model_cls=UNet2DModel, model_config=model.config)
    ema.load_state_dict(ema_state)
    return ema


def _fingerprint(tc: DDPMTrainConfig, sample_size, data_fp) -> str:
    ident = {"train": tc.identity(), "sample_size": list(sample_size), "data": data_fp}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def train_ddpm(dataset, tc: DDPMTrainConfig, out_dir, device=None, resume: bool = True,
               overwrite: bool = False, desc: str = "train DDPM"):
    """Trains the target DDPM for ``tc.steps`` steps on the images of ``dataset`` and writes the EMA
    pipeline to ``out_dir``. Returns ``(pipeline, history)`` (history: DataFrame step, loss, lr, sec).

    ``resume``: continue from the newest checkpoint of the same fingerprint (same settings and data);
    without it, existing checkpoints are an error unless ``overwrite`` discards them.
    """
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers.training_utils import EMAModel

    out_dir = Path(out_dir)
    images = dataset if isinstance(dataset, _Images) else images_only(dataset)
    if len(images) == 0:
        raise ValueError("DDPM training data is empty")
    first = images[0]
    if first.dim() != 3 or first.shape[0] != 3:
        raise ValueError(f"DDPM training images must be (3,H,W) in [-1,1], got {tuple(first.shape)}")
    sample_size = tuple(first.shape[1:])
    fp = _fingerprint(tc, sample_size, _data_fingerprint(getattr(images, "data", dataset)))
    ckpt_dir = checkpoint_root(out_dir) / fp[:12]
    device = runs.pick_device(device)

    ckpts = list_checkpoints(ckpt_dir)
    if ckpts and not resume:
        if not overwrite:
            raise FileExistsError(f"{ckpt_dir} holds a checkpoint at step {ckpts[-1][0]}: resume from it "
                                  "(--resume) or discard it (--overwrite)")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpts = []
    for stale in checkpoint_root(out_dir).glob("*"):
        if stale.is_dir() and stale != ckpt_dir and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)   # other settings: no longer resumable here

    runs.seed_everything(tc.seed)
    scheduler = build_scheduler(tc)
    start, history, state = 0, [], None
    ckpts = [c for c in ckpts if c[0] <= tc.steps]   # a longer earlier run: take its state at <= steps
    if ckpts:
        start, path = ckpts[-1]
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fp:
            raise ValueError(f"checkpoint {path} has another fingerprint; remove {ckpt_dir} or pass overwrite")
        unet = UNet2DModel.from_pretrained(path / "unet")
        ema = _load_ema(path / "unet_ema")
        history = list(state["history"])
    else:
        unet = build_unet(tc.size, sample_size)
        ema = EMAModel(unet.parameters(), decay=tc.ema_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=tc.ema_power, model_cls=UNet2DModel, model_config=unet.config)

    if start < tc.steps:
        accelerator = runs.accelerator_for(device, tc.amp)
        rank, world = accelerator.process_index, accelerator.num_processes
        if tc.batch_size % world:
            raise ValueError(f"ddpm_batch_size={tc.batch_size} is not divisible by {world} processes")
        unet.to(accelerator.device)
        ema.to(accelerator.device)
        opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup)))
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
        model, opt = accelerator.prepare(unet, opt)
        if state is not None:
            runs.restore_loop_state(accelerator, state)
        sampler = _StepBatches(len(images), tc.batch_size, tc.seed, start, tc.steps, rank, world)
        loader = torch.utils.data.DataLoader(images, batch_sampler=sampler, num_workers=tc.num_workers)
        bar = runs.progress(total=tc.steps, initial=start, desc=desc,
                            **({} if accelerator.is_main_process else {"disable": True}))
        model.train()
        t0 = time.perf_counter() - (history[-1]["sec"] if history else 0.0)
        step = start
        for x0 in loader:
            g = _step_generator(tc.seed, step, rank)
            x0 = x0.to(accelerator.device, non_blocking=True)
            if tc.flip:
                flip = torch.rand(x0.shape[0], generator=g) < 0.5
                x0 = torch.where(flip.to(x0.device).view(-1, 1, 1, 1), x0.flip(-1), x0)
            with accelerator.autocast():
                loss = ddpm_loss(model, scheduler, x0, g, tc.snr_gamma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if tc.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            lr_sched.step()
            ema.step(accelerator.unwrap_model(model).parameters())
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                            "ema_decay": float(ema.cur_decay_value or 0.0), "sec": time.perf_counter() - t0})
            bar.update(1)
            if step % 10 == 0 or step == tc.steps:
                bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-50:]]):.4f}")
            due = step == tc.steps or (tc.ckpt_every and step % tc.ckpt_every == 0)
            if due and accelerator.is_main_process:
                st = {"step": step, "fingerprint": fp, "optimizer": opt.state_dict(),
                      "lr_scheduler": lr_sched.state_dict(), "history": history,
                      "config": dataclasses.asdict(tc), "sample_size": sample_size,
                      **runs.loop_state(accelerator)}
                save_checkpoint(ckpt_dir, step, accelerator.unwrap_model(model), ema, scheduler, st, tc.keep_ckpts)
        bar.close()
        accelerator.wait_for_everyone()
        unet = accelerator.unwrap_model(model)
        is_main = accelerator.is_main_process
    else:
        is_main = True

    ema_unet = build_unet(tc.size, sample_size)
    ema.copy_to(ema_unet.parameters())
    ema_unet.eval()
    pipe = DDPMPipeline(unet=ema_unet.cpu(), scheduler=scheduler)
    hist = pd.DataFrame(history, columns=["step", "loss", "lr", "ema_decay", "sec"])
    if is_main:
        meta = {"fingerprint": fp, "steps": len(history), "config": dataclasses.asdict(tc),
                "sample_size": list(sample_size), "train_seconds": float(hist["sec"].iloc[-1]) if len(hist) else 0.0,
                "final_loss": float(hist["loss"].tail(50).mean()) if len(hist) else None,
                "n_images": len(images), "checkpoints": str(ckpt_dir)}
        save_pipeline(pipe, out_dir, meta, hist)
    return pipe, hist


def save_pipeline(pipe, out_dir, meta: dict | None = None, history: pd.DataFrame | None = None) -> Path:
    """``pipe.save_pretrained`` into a temp folder, then renamed to ``out_dir`` (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp)
        if history is not None:
            history.to_csv(tmp / "history.csv", index=False)
        runs.atomic_save_json(tmp / META_NAME, meta or {})
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_ddpm(path, device=None):
    """The saved ``DDPMPipeline`` (EMA UNet in eval mode + DDPMScheduler) on ``device``."""
    from diffusers import DDPMPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} holds no saved DDPM pipeline (model_index.json missing): "
                                f"train it first (notebook {NOTEBOOK} or `dasslab train-ddpm`)")
    pipe = DDPMPipeline.from_pretrained(path)
    pipe.unet.eval().requires_grad_(False)
    pipe.to(runs.pick_device(device or "auto"))
    pipe.set_progress_bar_config(disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
    return pipe


def read_meta(path) -> dict:
    p = Path(path) / META_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def read_history(path) -> pd.DataFrame:
    p = Path(path) / "history.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: the DDPM in {path} has no loss history")
    return pd.read_csv(p)


def ddpm_dir(rd) -> Path:
    return Path(rd.artifacts) / "ddpm"


def target_ddpm(rd, cfg, sets=None, device=None, resume: bool = True, overwrite: bool = False, **overrides):
    """The run's target DDPM: loaded from ``rd.artifacts/ddpm`` when it was trained with the same
    settings, data and at least as many steps; otherwise trained (resuming from checkpoints).
    Returns ``(pipeline, history)``."""
    from dasslab import datasets

    tc = train_config(cfg, **overrides)
    sets = sets or datasets.benchmark_sets(cfg, size=resolution(cfg))
    target = images_only(sets["target_train"])
    out = ddpm_dir(rd)
    meta = read_meta(out)
    if meta:
        fp = _fingerprint(tc, tuple(target[0].shape[1:]), _data_fingerprint(target.data))
        if meta.get("fingerprint") == fp and meta.get("steps", 0) == tc.steps and not overwrite:
            return load_ddpm(out, device=device or cfg.get("device")), read_history(out)
    pipe, hist = train_ddpm(target, tc, out, device=device or cfg.get("device"), resume=resume, overwrite=overwrite)
    pipe.to(runs.pick_device(device or cfg.get("device") or "auto"))
    return pipe, hist


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    cfg = runs.load_config(args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device,
                           data_root=args.data_root)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    runs.set_threads()
    rd = runs.RunDir(cfg.run_dir)
    tc = train_config(cfg, steps=args.steps)
    out = ddpm_dir(rd)
    meta = read_meta(out)
    from dasslab import datasets

    target = images_only(datasets.benchmark_sets(cfg, size=resolution(cfg))["target_train"])
    fp = _fingerprint(tc, tuple(target[0].shape[1:]), _data_fingerprint(target.data))
    if meta.get("fingerprint") == fp and meta.get("steps") == tc.steps and not args.overwrite:
        print(f"{out} already holds this DDPM ({tc.steps} steps); nothing to do")
        return 0
    t0 = time.perf_counter()
    try:
        _, hist = train_ddpm(target, tc, out, device=cfg.device, resume=args.resume, overwrite=args.overwrite)
    except FileExistsError as e:
        raise runs.RunError(str(e)) from e
    print(f"DDPM ({tc.size}, {tc.steps} steps) written to {out}: final loss "
          f"{hist['loss'].tail(50).mean():.4f}, {time.perf_counter() - t0:.0f} s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-ddpm", help="train the target-domain DDPM (notebook 01's model)",
        description="Train the unconditional target-domain DDPM of a run (the profile's "
                    f"[{NOTEBOOK}] ddpm_* settings). Many GPUs: accelerate launch -m dasslab train-ddpm ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", default="demo", help="profile name or .toml path")
    p.add_argument("--run-dir", required=True, help="run directory (the model goes to artifacts/ddpm)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", default=None, help="dataset root (default: the profile's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's ddpm_steps)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="discard existing checkpoints and start again")
    p.set_defaults(func=_cmd_train)


__all__ = [
    "SIZE_PRESETS",
    "DDPMTrainConfig",
    "build_scheduler",
    "build_unet",
    "checkpoint_root",
    "ddpm_dir",
    "ddpm_loss",
    "images_only",
    "list_checkpoints",
    "load_ddpm",
    "read_history",
    "read_meta",
    "register",
    "resolution",
    "save_checkpoint",
    "save_pipeline",
    "target_ddpm",
    "train_config",
    "train_ddpm",
]
