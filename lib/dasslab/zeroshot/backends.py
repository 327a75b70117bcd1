"""The one interface every layout-to-image backend offers, and how to pick one by name.

``transfer(images, labels, prompt, strength, generator) -> images``: images are float (B,3,H,W) in
[-1, 1], labels int64 (B,H,W) Cityscapes train ids (255 = ignore); the result has the input's shape,
so a transferred image lines up pixel for pixel with the source label it was generated from.
"""
from __future__ import annotations

import abc
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 19
IGNORE_INDEX = 255
BACKENDS = ("embedded", "sd-controlnet")


class TransferBackend(abc.ABC):
    """A layout-to-image generator that regenerates a source image under a prompt."""

    name: str = "backend"

    @abc.abstractmethod
    def transfer(self, images: torch.Tensor, labels: torch.Tensor, prompt: str, strength: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        ...

    def settings(self) -> dict:
        """What a translated set records about how it was made (translation.json)."""
        return {"backend": self.name}


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"labels must be (B,H,W) matching images {tuple(images.shape)}, "
                         f"got {tuple(labels.shape)}")


@lru_cache(maxsize=1)
def train_id_palette() -> np.ndarray:
    """(256, 3) uint8: the Cityscapes colour of each train id (void/255 black), as *_gtFine_color.png."""
    from dasslab import labels as dl

    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = np.asarray(dl.PALETTE, dtype=np.uint8).reshape(-1, 3)[:NUM_CLASSES]
    return lut


def colour_layout(labels: torch.Tensor) -> torch.Tensor:
    """Train ids (B,H,W) -> colour label images (B,3,H,W) in [0,1]: ZoDi's ControlNet condition."""
    lut = torch.from_numpy(train_id_palette()).to(labels.device)
    idx = labels.long().clamp(0, 255)
    return lut[idx].permute(0, 3, 1, 2).float() / 255.0


def one_hot_layout(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Train ids (B,H,W) -> (B, C+1, H, W) one-hot planes; the last plane marks ignore pixels."""
    idx = labels.long().clone()
    idx[(idx < 0) | (idx >= num_classes)] = num_classes
    return torch.nn.functional.one_hot(idx, num_classes + 1).permute(0, 3, 1, 2).float()


def make_backend(name: str, **kwargs) -> TransferBackend:
    """``embedded`` (kwargs: model_dir or model, device, ...) or ``sd-controlnet`` (model_dir, ...)."""
    if name == "embedded":
        from dasslab.zeroshot.embedded import EmbeddedBackend

        return EmbeddedBackend.from_dir(**kwargs) if "model" not in kwargs else EmbeddedBackend(**kwargs)
    if name == "sd-controlnet":
        from dasslab.zeroshot.sd_controlnet import SDControlNetBackend

        return SDControlNetBackend.from_dir(**kwargs)
    raise ValueError(f"unknown zero-shot backend {name!r}; known: {', '.join(BACKENDS)}")
