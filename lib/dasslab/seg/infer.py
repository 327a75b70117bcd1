"""Inference (whole image or sliding window), evaluation on a dataset, saving and loading segmenters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dasslab import runs
from dasslab.metrics import ConfusionMatrix

from .models import build_segmenter
from .train import as_dataset, collate

FORMAT = "dasslab-segmenter-v1"


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _windows(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)
    return starts


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, mode: str = "whole", crop=None, stride=None
) -> torch.Tensor:
    """Logits (B,C,H,W) for images (B,3,H,W). ``mode="slide"`` averages overlapping ``crop`` windows
    (``stride`` defaults to half the crop), as full-resolution Cityscapes inference does."""
    if mode == "whole":
        return model(x).float()
    if mode != "slide":
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if crop is None:
        raise ValueError("sliding-window inference needs crop=(H, W)")
    ch, cw = crop
    sh, sw = stride or (max(1, ch // 2), max(1, cw // 2))
    B, _, H, W = x.shape
    out, count = None, torch.zeros(1, 1, H, W, device=x.device)
    for y0 in _windows(H, ch, sh):
        for x0 in _windows(W, cw, sw):
            tile = x[..., y0 : y0 + ch, x0 : x0 + cw]
            lg = model(tile).float()
            if out is None:
                out = torch.zeros(B, lg.shape[1], H, W, device=x.device)
            out[..., y0 : y0 + tile.shape[-2], x0 : x0 + tile.shape[-1]] += lg
            count[..., y0 : y0 + tile.shape[-2], x0 : x0 + tile.shape[-1]] += 1
    return out / count


@torch.no_grad()
def predict(
    model: nn.Module, images, batch_size: int = 16, device=None, mode: str = "whole", crop=None, stride=None
) -> torch.Tensor:
    """Train-id predictions (N,H,W) int64 on the CPU for a tensor (N,3,H,W) or a dataset."""
    device = _model_device(model) if device is None else runs.pick_device(str(device))
    was_training = model.training
    model.eval().to(device)
    try:
        outs = []
        if isinstance(images, torch.Tensor):
            batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            loader = DataLoader(as_dataset(images), batch_size=batch_size, collate_fn=collate)
            batches = (b["image"] for b in loader)
        for xb in batches:
            outs.append(predict_logits(model, xb.to(device), mode, crop, stride).argmax(1).cpu())
        return torch.cat(outs)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 16,
    device=None,
    mode: str = "whole",
    crop=None,
    stride=None,
    num_classes: int | None = None,
    desc: str = "evaluate",
    num_workers: int = 0,
) -> dict:
    """Scores a segmenter on a labelled dataset: one confusion matrix over the whole split.

    Returns ``{"mIoU", "acc", "per_class", "mIoU16", "mIoU13", "confusion", "n_images"}`` in percent
    (see :meth:`dasslab.metrics.ConfusionMatrix.summary`).
    """
    ds = as_dataset(dataset)
    if len(ds) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    num_classes = num_classes or getattr(model, "seg_config", {}).get("num_classes", 19)
    device = _model_device(model) if device is None else runs.pick_device(str(device))
    was_training = model.training
    model.eval().to(device)
    cm = ConfusionMatrix(num_classes)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    try:
        for batch in runs.progress(loader, desc=desc, leave=False):
            if "label" not in batch:
                raise ValueError("evaluate needs a dataset with labels (items without 'label')")
            logits = predict_logits(model, batch["image"].to(device), mode, crop, stride)
            if logits.shape[-2:] != batch["label"].shape[-2:]:
                logits = F.interpolate(
                    logits, size=batch["label"].shape[-2:], mode="bilinear", align_corners=False
                )
            cm.update(logits.argmax(1), batch["label"].to(device))
    finally:
        model.train(was_training)
    res = cm.summary()
    res["n_images"] = len(ds)
    return res


def save_segmenter(model: nn.Module, directory, meta: dict | None = None) -> Path:
    """``directory/model.safetensors`` + ``config.json`` (architecture and ``meta``), each atomic."""
    from safetensors.torch import save_model

    model = getattr(model, "module", model)
    cfg = getattr(model, "seg_config", None)
    if cfg is None:
        raise ValueError("save_segmenter needs a model made by seg.build_segmenter (no seg_config attribute)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(directory / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    runs.atomic_save_json(directory / "config.json", {"format": FORMAT, **cfg, "meta": meta or {}})
    return directory


def load_segmenter(directory, device=None) -> nn.Module:
    """Rebuilds a saved segmenter (eval mode) on ``device`` (default cpu); ``model.seg_meta`` holds meta."""
    import json

    from safetensors.torch import load_model

    directory = Path(directory)
    cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"no saved segmenter in {directory}: {p.name} is missing")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a dasslab segmenter config (format {cfg.get('format')!r})")
    model = build_segmenter(cfg["name"], cfg["num_classes"], **cfg.get("kwargs", {}))
    load_model(model, str(w_path), device="cpu")
    model.seg_meta = cfg.get("meta", {})
    dev = torch.device("cpu") if device is None else runs.pick_device(str(device))
    return model.to(dev).eval()


@torch.no_grad()
def write_predictions(
    model: nn.Module,
    dataset,
    out_dir,
    batch_size: int = 16,
    device=None,
    mode: str = "whole",
    crop=None,
    stride=None,
) -> Path:
    """Predictions in the official Cityscapes format: ``out_dir/<name>_pred_labelIds.png`` holding
    label ids (what ``dasslab evaluate --pred-dir`` and the official evaluator read). Predictions
    are made at the dataset's resolution; each file is written atomically."""
    from dasslab import labels
    from dasslab.datasets import save_png

    ds = as_dataset(dataset)
    out_dir = Path(out_dir)
    names = list(getattr(ds, "names", [None] * len(ds)))
    preds = predict(model, ds, batch_size=batch_size, device=device, mode=mode, crop=crop, stride=stride)
    for i, pred in enumerate(preds):
        name = names[i] if names[i] is not None else ds[i]["name"]
        save_png(
            out_dir / f"{name}_pred_labelIds.png", labels.train_to_label_ids(pred.numpy().astype(np.uint8))
        )
    return out_dir
