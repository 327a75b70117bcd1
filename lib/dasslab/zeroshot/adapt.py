"""ZoDi model adaptation: source images and their transferred twins, same labels, similar features.

For a pair (x, x~, y) -- a source image, its zero-shot transfer and the source label -- the loss is

    L = CE(f(x), y) + CE(f(x~), y) - lambda * cos(GAP(z(x)), GAP(z(x~)))

with z the backbone's last-stage feature map (``model.forward_features``), GAP global average
pooling and lambda = 0.1 (official code; features L2-normalised by the cosine, no stop-gradient).
The first two terms teach the segmenter the target look with labels it already has; the third pulls
the two domains' image-level features together so the decision boundaries transfer.

It is a ``loss_fn`` for :func:`dasslab.seg.train_segmenter`: no second training loop. That loop crops
and flips every image-shaped tensor of a batch alike, so ``image`` and ``image_t`` keep the same
geometric augmentation. Model selection never looks at target images: the schedule is fixed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IGNORE_INDEX = 255
VARIANTS = ("source-only", "transfer", "zodi")


class PairedDataset(Dataset):
    """Items ``{"image", "image_t", "label", "name"}``: source image, its transfer, the source label.

    ``transferred`` is matched to ``source`` by item name (``write_translated`` keeps the source
    names); a source item without a transfer is an error naming it. The transferred set's own label
    files are checked to be the source's (they were written from them), then ignored.
    """

    def __init__(self, source, transferred, check_labels: bool = True):
        self.source, self.transferred = source, transferred
        t_index = {n: i for i, n in enumerate(transferred.names)}
        missing = [n for n in source.names if n not in t_index]
        if missing:
            raise ValueError(f"PairedDataset: {len(missing)} source items have no transfer in "
                             f"{getattr(transferred, 'root', transferred)} (first: {missing[0]!r}); "
                             "run the transfer for the whole source set")
        self.t_idx = [t_index[n] for n in source.names]
        if check_labels:
            for i in range(min(4, len(source))):
                a = source[i]["label"]
                b = transferred[self.t_idx[i]]["label"]
                if not torch.equal(a, b):
                    raise ValueError(f"PairedDataset: labels of {source.names[i]!r} differ between the source "
                                     f"and {getattr(transferred, 'root', 'the transferred set')}")

    def __len__(self) -> int:
        return len(self.source)

    @property
    def names(self) -> list[str]:
        return list(self.source.names)

    def __getitem__(self, i: int) -> dict:
        s = self.source[i]
        t = self.transferred[self.t_idx[i]]
        if t["image"].shape != s["image"].shape:
            raise ValueError(f"PairedDataset: transfer of {s['name']!r} is {tuple(t['image'].shape)}, "
                             f"source is {tuple(s['image'].shape)}")
        return {"image": s["image"], "image_t": t["image"], "label": s["label"], "name": s["name"]}

    def fingerprint(self) -> dict:
        from dasslab.seg import dataset_fingerprint

        return {"type": "PairedDataset", "source": dataset_fingerprint(self.source),
                "transferred": dataset_fingerprint(self.transferred)}

    def roots(self) -> list[str]:
        """The folders this dataset reads (the data lineage of an adaptation)."""
        return [str(getattr(d, "root", d)) for d in (self.source, self.transferred)]


def _ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    if not bool((label != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)


def pooled_features(model, x: torch.Tensor) -> torch.Tensor:
    """GAP of the last-stage backbone features: (B, F)."""
    z = model.forward_features(x)
    if z.ndim == 3:  # (B, tokens, F) transformer outputs
        return z.mean(1)
    return z.mean(dim=(2, 3))


def feature_similarity(model, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the pooled features of each image and its twin."""
    return F.cosine_similarity(pooled_features(model, x).float(), pooled_features(model, x_t).float(), dim=1).mean()


class ZoDiLoss:
    """``loss_fn(model, batch) -> (loss, logs)`` for ``seg.train_segmenter``.

    ``variant``: "source-only" (CE on x), "transfer" (CE on x and x~), "zodi" (+ feature similarity
    with weight ``lambda_sim``). The same augmentation path serves all three, so the ablation
    changes only the loss.
    """

    def __init__(self, variant: str = "zodi", lambda_sim: float = 0.1):
        if variant not in VARIANTS:
            raise ValueError(f"ZoDiLoss variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.lambda_sim = variant, float(lambda_sim)
        self.__qualname__ = f"ZoDiLoss[{variant},lambda={self.lambda_sim}]"  # seg's cache key reads it

    def settings(self) -> dict:
        return {"variant": self.variant, "lambda_sim": self.lambda_sim if self.variant == "zodi" else 0.0}

    def __call__(self, model, batch):
        x, y = batch["image"], batch["label"]
        ce_s = _ce(model(x), y)
        logs = {"ce_source": float(ce_s.detach())}
        if self.variant == "source-only":
            return ce_s, logs
        x_t = batch["image_t"]
        ce_t = _ce(model(x_t), y)
        loss = ce_s + ce_t
        logs["ce_transfer"] = float(ce_t.detach())
        if self.variant == "zodi" and self.lambda_sim:
            cos = feature_similarity(model, x, x_t)
            loss = loss - self.lambda_sim * cos
            logs["cos"] = float(cos.detach())
        return loss, logs
