"""What the two GAN translators share: step-keyed batches, atomic checkpoints,
and writing a translated set (GTA5 layout + translation.json).

Exact resume: the images and random crops used at step ``s`` depend only on ``(seed, s)``, and a
checkpoint holds the weights (safetensors) plus optimizer, RNG and any extra training state, so a
resumed run ends where an uninterrupted one does.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dasslab import runs
from dasslab.checkpoints import checkpoints, load_tensors, save_checkpoint, save_tensors  # noqa: F401 (shared)


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one training step (batch indices, crops, pool draws)."""
    return np.random.default_rng([int(seed), int(step), int(stream)])


def draw_indices(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=batch_size, replace=n < batch_size)


def load_batch(dataset, idx) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in idx])


def random_crops(x: torch.Tensor, size, rng: np.random.Generator) -> torch.Tensor:
    """One random (h, w) crop per image of ``x`` (B,C,H,W), positions from ``rng``."""
    h, w = int(size[0]), int(size[1])
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"crop size {(h, w)} exceeds the image size {(H, W)}")
    ys = rng.integers(0, H - h + 1, size=len(x))
    xs = rng.integers(0, W - w + 1, size=len(x))
    return torch.stack([x[i, :, y:y + h, z:z + w] for i, (y, z) in enumerate(zip(ys, xs))])


class StaleCheckpoint(ValueError):
    """Checkpoints in a folder were made with other settings (or another segmenter / data)."""


def identity_mismatch(saved: dict | None, current: dict, where: Path) -> None:
    if saved != current:
        diff = sorted(k for k in set(saved or {}) | set(current) if (saved or {}).get(k) != current.get(k))
        raise StaleCheckpoint(f"checkpoints in {where} come from another training config (differs in {diff}); "
                         "use resume=False or another out_dir")


def clear_checkpoints(out_dir: Path) -> None:
    """Removes a training folder's checkpoints (before retraining with other settings)."""
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def write_history(out_dir: Path, history) -> None:
    import pandas as pd

    with runs.atomic_write(Path(out_dir) / "history.csv", "w") as f:
        pd.DataFrame(history).to_csv(f, index=False)


def read_history(out_dir):
    """The training curve a finished run wrote (``history.csv``), as a DataFrame."""
    import pandas as pd

    p = Path(out_dir) / "history.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: train first")
    return pd.read_csv(p)


@torch.no_grad()
def translate_to_folder(fn, dataset, out_dir, method: str, params: dict, batch_size: int = 16,
                        device=None, desc: str = "translate") -> dict:
    """Runs ``fn(images) -> images`` ([-1,1] batches) over ``dataset`` and writes the translated set in
    the GTA5 layout with the dataset's own labels, then ``translation.json`` (written last, so its
    presence marks a complete set)."""
    from dasslab import datasets

    out_dir = Path(out_dir)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"translate {method}: the dataset to translate is empty")
    marker = out_dir / "translation.json"
    if marker.exists():
        marker.unlink()  # an older, possibly different set is being replaced
    device = runs.pick_device(device)
    seconds, names = 0.0, []
    for b0 in runs.progress(range(0, n, batch_size), desc=desc, total=-(-n // batch_size)):
        items = [dataset[i] for i in range(b0, min(n, b0 + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(device)
        t0 = time.perf_counter()
        y = fn(x).clamp(-1, 1).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        batch_names = [it["name"] for it in items]
        datasets.write_translated(out_dir, batch_names, y.cpu(), torch.stack([it["label"] for it in items]))
        names += batch_names
    meta = {"method": method, "n_images": n, "seconds_per_image": seconds / n, "seconds_total": seconds,
            "device": str(device), "params": params, "names_sha": _names_digest(names)}
    runs.atomic_save_json(marker, meta)
    return meta


def _names_digest(names) -> str:
    import hashlib

    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def translation_is_current(out_dir, params: dict, n_images: int) -> bool:
    """True when ``out_dir`` holds a complete translated set made with exactly ``params``."""
    marker = Path(out_dir) / "translation.json"
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("params") == runs.to_jsonable(params) and meta.get("n_images") == n_images


def weights_digest(module: nn.Module) -> str:
    """A short hash of a module's weights and buffers (to refuse resuming on another network)."""
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu()
        h.update(k.encode())
        h.update((v.float() if v.dtype == torch.bfloat16 else v).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ImageBank:
    """Images of a dataset by index: held in memory when they fit in ``max_bytes``, else read per step."""

    def __init__(self, dataset, max_bytes: int = 2 ** 28, what: str = "dataset"):
        n = len(dataset)
        if n == 0:
            raise ValueError(f"{what} is empty: nothing to train on")
        first = dataset[0]["image"]
        self.dataset, self.n, self.shape = dataset, n, tuple(first.shape)
        self.images = None
        if n * first.numel() * 4 <= max_bytes:
            self.images = torch.stack([dataset[i]["image"] for i in range(n)])

    def __len__(self) -> int:
        return self.n

    def batch(self, idx) -> torch.Tensor:
        if self.images is not None:
            return self.images[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
        return load_batch(self.dataset, idx)
