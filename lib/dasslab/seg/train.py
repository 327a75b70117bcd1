"""One training loop for every segmenter in dasslab.

Methods differ only in their loss (ZoDi's feature similarity, noise-aware guides, ...), so they pass
``loss_fn(model, batch) -> (loss, logs)`` and reuse this loop: Accelerate (mixed precision on CUDA
only), AdamW or SGD with a poly schedule, uniform or rare-class sampling, crop/flip augmentation
applied alike to every image-shaped tensor of a batch (so paired keys such as ``image_t`` stay
aligned), periodic atomic checkpoints and exact resume.

Exact resume: the batch drawn at step ``s`` and its augmentation depend only on ``(seed, s)``, and a
checkpoint holds weights (safetensors) plus optimizer, scheduler and RNG states, so a run resumed
from any checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from dasslab import checkpoints, runs

IGNORE_INDEX = 255


@dataclass
class TrainConfig:
    """Budget and options of one segmenter training (see the ``[seg]`` table of a profile)."""

    iters: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    crop: tuple[int, int] | None = None  # random crop (H, W); None keeps the full image
    flip: bool = True  # random horizontal flip
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1-j, 1+j] (ZoDi: 0.5)
    amp: bool = True  # bf16 (or fp16) autocast, on CUDA only
    ckpt_every: int = 0  # 0: only the final checkpoint (when out_dir is given)
    sampling: str = "uniform"  # "uniform" epochs | "rare-class" (DAFormer's RCS)
    rcs_temperature: float = 0.01
    class_balanced: bool = False  # CE weighted by 1 / log(1.02 + class frequency)
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9, the DeepLab recipe)
    momentum: float = 0.9
    poly_power: float = 0.9
    warmup_iters: int = 0
    grad_clip: float | None = None
    num_workers: int = 0
    keep_ckpts: int = 2
    extra: dict = field(default_factory=dict)  # free-form, recorded with the run (method settings)

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(
                f"TrainConfig: iters and batch_size must be >= 1, got {self.iters}, {self.batch_size}"
            )
        if self.sampling not in ("uniform", "rare-class"):
            raise ValueError(f"TrainConfig.sampling must be 'uniform' or 'rare-class', got {self.sampling!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.crop is not None:
            self.crop = tuple(int(c) for c in self.crop)
            if len(self.crop) != 2:
                raise ValueError(f"TrainConfig.crop must be (H, W), got {self.crop}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        return d

    # the fields that change the trained weights (not bookkeeping such as checkpoint cadence)
    def identity(self) -> dict:
        d = self.to_dict()
        for k in ("ckpt_every", "num_workers", "keep_ckpts"):
            d.pop(k)
        return d

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def as_dataset(data) -> Dataset:
    """A dataset, a list of datasets (concatenated) or a list of item dicts."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("no training data: empty list of datasets")
        if all(isinstance(d, dict) for d in data):
            return _ListDataset(data)
        return data[0] if len(data) == 1 else ConcatDataset(list(data))
    return data


def collate(items: list[dict]) -> dict:
    """Stacks tensors / arrays / numbers key by key; anything else (names) stays a list."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(v0, np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        elif isinstance(v0, (int, float, np.integer, np.floating)) and not isinstance(v0, bool):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepBatches:
    """Batch indices for steps ``start..stop-1``, a pure function of (seed, step, rank)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.stop, self.weights = start, stop, weights
        self.rank, self.world = rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        if self.weights is not None:
            g = torch.Generator().manual_seed(_mix(self.seed, step, self.rank, 2))
            return torch.multinomial(self.weights, self.bs, replacement=True, generator=g).tolist()
        first = (step * self.world + self.rank) * self.bs
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.bs)]

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield self.indices(s)

    def __len__(self):
        return max(0, self.stop - self.start)


def augment(batch: dict, tc: TrainConfig, step: int, rank: int = 0) -> dict:
    """Random crop and horizontal flip per sample, identical for every (…, H, W) tensor of the batch
    (so paired images and labels stay aligned); colour jitter, drawn independently for every
    ``image*`` key."""
    if not tc.flip and tc.crop is None and not tc.color_jitter:
        return batch
    ref = batch.get("label", batch.get("image"))
    if ref is None:
        return batch
    H, W = ref.shape[-2:]
    B = ref.shape[0]
    g = torch.Generator().manual_seed(_mix(tc.seed, step, rank, 3))
    flips = (torch.rand(B, generator=g) < 0.5).tolist() if tc.flip else [False] * B
    if tc.crop is not None:
        ch, cw = tc.crop
        if ch > H or cw > W:
            raise ValueError(f"TrainConfig.crop {tc.crop} is larger than the training images ({H}, {W})")
        ys = torch.randint(0, H - ch + 1, (B,), generator=g).tolist()
        xs = torch.randint(0, W - cw + 1, (B,), generator=g).tolist()
    out = dict(batch)
    for k, v in batch.items():
        if not (isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[0] == B and v.shape[-2:] == (H, W)):
            continue
        parts = []
        for i in range(B):
            t = v[i]
            if tc.crop is not None:
                t = t[..., ys[i] : ys[i] + ch, xs[i] : xs[i] + cw]
            if flips[i]:
                t = t.flip(-1)
            parts.append(t)
        out[k] = torch.stack(parts).contiguous()
    if tc.color_jitter:
        for j, k in enumerate(sorted(out)):
            v = out[k]
            if k.startswith("image") and isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[1] == 3:
                gj = torch.Generator().manual_seed(_mix(tc.seed, step, rank, 4, j))
                out[k] = color_jitter(v, tc.color_jitter, gj)
    return out


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in [1-s, 1+s] on [-1, 1] images."""
    B = x.shape[0]
    f = 1 + (torch.rand(3, B, 1, 1, 1, generator=generator) * 2 - 1) * strength
    y = (x.float() + 1) / 2 * f[0]
    gray = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]).clamp(0, 1)
    y = (y - gray.mean((2, 3), keepdim=True)) * f[1] + gray.mean((2, 3), keepdim=True)
    gray = 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]
    y = (gray + (y - gray) * f[2]).clamp(0, 1)
    return (y * 2 - 1).to(x.dtype)


def _labels(dataset):
    """Label maps of a dataset, without decoding images where the dataset allows (SegFolder)."""
    if isinstance(dataset, ConcatDataset):
        for d in dataset.datasets:
            yield from _labels(d)
    elif callable(getattr(dataset, "read_label", None)):
        for i in range(len(dataset)):
            yield torch.from_numpy(np.asarray(dataset.read_label(i)).astype(np.int64))
    else:
        for i in range(len(dataset)):
            yield torch.as_tensor(dataset[i]["label"])


def label_statistics(dataset: Dataset, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count per class over the set and a per-image class-presence matrix (N, C)."""
    counts = np.zeros(num_classes, np.int64)
    present = np.zeros((len(dataset), num_classes), bool)
    for i, lab in enumerate(_labels(dataset)):
        lab = lab.reshape(-1).long()
        lab = lab[(lab >= 0) & (lab < num_classes)]
        c = torch.bincount(lab, minlength=num_classes).numpy()
        counts += c
        present[i] = c > 0
    return counts, present


def rare_class_weights(counts: np.ndarray, present: np.ndarray, temperature: float) -> torch.Tensor:
    """Per-image sampling probabilities of DAFormer's rare-class sampling.

    A class c is drawn with P(c) ~ exp((1 - f_c) / T) among classes that occur, then an image holding
    c uniformly; the image marginal is sum_c P(c) [c in image] / n_c.
    """
    f = counts / max(1, counts.sum())
    n_c = present.sum(0)
    ok = n_c > 0
    logits = np.where(ok, (1 - f) / temperature, -np.inf)
    p = np.exp(logits - logits[ok].max())
    p = p / p.sum()
    w = (present * np.where(ok, p / np.maximum(n_c, 1), 0.0)).sum(1)
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


def balanced_class_weights(counts: np.ndarray) -> torch.Tensor:
    """ENet-style class weights 1 / log(1.02 + f_c), mean 1 over the classes that occur."""
    f = counts / max(1, counts.sum())
    w = 1.0 / np.log(1.02 + f)
    ok = counts > 0
    w = np.where(ok, w / w[ok].mean(), 1.0)
    return torch.as_tensor(w, dtype=torch.float32)


def cross_entropy_loss(model, batch, class_weights: torch.Tensor | None = None):
    """The default loss: pixel cross-entropy on ``batch["image"]`` vs ``batch["label"]`` (255 ignored)."""
    logits = model(batch["image"])
    label = batch["label"]
    if not bool((label != IGNORE_INDEX).any()):
        return logits.sum() * 0.0, {}
    w = None if class_weights is None else class_weights.to(logits.device)
    return F.cross_entropy(logits.float(), label, weight=w, ignore_index=IGNORE_INDEX), {}


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def _lr_lambda(tc: TrainConfig):
    def f(step: int) -> float:
        if tc.warmup_iters and step < tc.warmup_iters:
            return (step + 1) / tc.warmup_iters
        return max(0.0, 1.0 - step / tc.iters) ** tc.poly_power

    return f


def train_segmenter(
    model: nn.Module,
    dataset_or_list,
    tc: TrainConfig,
    out_dir=None,
    device=None,
    loss_fn=None,
    resume: bool = True,
    desc: str = "train segmenter",
):
    """Trains ``model`` for ``tc.iters`` steps; returns ``(model, history)``.

    ``loss_fn(model, batch) -> (loss, {name: float})`` replaces the default cross-entropy; ``batch``
    is the collated dict of dataset items (extra keys pass through, augmented alike when they are
    image-shaped). With ``out_dir`` checkpoints go to ``out_dir/checkpoints/step_*`` (every
    ``tc.ckpt_every`` steps and at the end) and the history to ``out_dir/history.csv``; with
    ``resume`` the newest checkpoint is loaded and training continues from it.
    """
    from safetensors.torch import load_model

    dataset = as_dataset(dataset_or_list)
    if len(dataset) == 0:
        raise ValueError("no training data: the dataset is empty")
    device = runs.pick_device(device)
    out_dir = Path(out_dir) if out_dir is not None else None
    num_classes = getattr(model, "seg_config", {}).get("num_classes", 19)

    start, history, state = 0, [], None
    if out_dir is not None and resume:
        ckpts = checkpoints.checkpoints(out_dir)
        if ckpts:
            step, path = ckpts[-1]
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            if state.get("tc_identity") != tc.identity():
                raise ValueError(
                    f"checkpoints in {out_dir} come from another training config "
                    f"({state.get('tc_identity')}); use resume=False or another out_dir"
                )
            load_model(model, str(path / "model.safetensors"), device="cpu")
            start, history = step, list(state["history"])
    if start >= tc.iters:
        return model.to(device).eval(), pd.DataFrame(history)

    runs.seed_everything(tc.seed)
    accelerator = runs.accelerator_for(device, tc.amp)
    rank, world = accelerator.process_index, accelerator.num_processes

    weights, class_w = None, None
    if tc.sampling == "rare-class" or tc.class_balanced:
        counts, present = label_statistics(dataset, num_classes)
        if tc.sampling == "rare-class":
            weights = rare_class_weights(counts, present, tc.rcs_temperature)
        if tc.class_balanced:
            class_w = balanced_class_weights(counts)
    if loss_fn is None:

        def loss_fn(m, b):
            return cross_entropy_loss(m, b, class_w)

    model.to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    model, opt = accelerator.prepare(model, opt)
    if state is not None:
        runs.restore_loop_state(accelerator, state)

    sampler = StepBatches(len(dataset), tc.batch_size, tc.seed, start, tc.iters, weights, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=tc.num_workers)
    bar = runs.progress(
        total=tc.iters, initial=start, desc=desc, **({} if accelerator.is_main_process else {"disable": True})
    )
    raw = accelerator.unwrap_model(model)
    model.train()
    t0 = time.perf_counter()
    step = start
    for batch in loader:
        batch = augment(batch, tc, step, rank)
        batch = {
            k: (v.to(accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
        }
        with accelerator.autocast():
            loss, logs = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if tc.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        step += 1
        row = {
            "iter": step,
            "loss": float(loss.detach()),
            "lr": opt.param_groups[0]["lr"],
            "sec": time.perf_counter() - t0,
        }
        row.update({k: float(v) for k, v in (logs or {}).items()})
        history.append(row)
        bar.update(1)
        if step % 10 == 0 or step == tc.iters:
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        due = step == tc.iters or (tc.ckpt_every and step % tc.ckpt_every == 0)
        if out_dir is not None and due and accelerator.is_main_process:
            st = {
                "step": step,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "tc_identity": tc.identity(),
                **runs.loop_state(accelerator),
            }
            checkpoints.save_checkpoint(out_dir, step, {"model": raw.state_dict()}, st, tc.keep_ckpts)
    bar.close()
    accelerator.wait_for_everyone()
    hist = pd.DataFrame(history)
    if out_dir is not None and accelerator.is_main_process:
        with runs.atomic_write(out_dir / "history.csv", "w") as f:
            hist.to_csv(f, index=False)
    raw.eval()
    return raw, hist


def smooth(history: pd.DataFrame, column: str = "loss", window: int = 20) -> pd.Series:
    """Running mean of a history column (for loss plots)."""
    return history[column].rolling(window, min_periods=1).mean()


__all__ = [
    "StepBatches",
    "TrainConfig",
    "as_dataset",
    "augment",
    "balanced_class_weights",
    "collate",
    "cross_entropy_loss",
    "label_statistics",
    "rare_class_weights",
    "smooth",
    "train_segmenter",
]
