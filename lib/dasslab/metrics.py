"""Segmentation and translation-quality metrics.

Segmentation scores follow the official Cityscapes evaluator (``cityscapesscripts``) to the pixel:
one confusion matrix over the whole split, per-class IoU = TP / (TP + FP + FN), mIoU = mean over the
classes whose IoU is defined (NaN-ignoring), ground-truth pixels labelled 255 are skipped, and a
valid ground-truth pixel predicted as a void id counts as a miss (FN) for its class but as nobody's
false positive. ``tests/test_evaluate_official.py`` checks this against the official code.

Translation quality: :func:`label_consistency` (a target-trained segmenter applied to translated
images, scored against the source labels) and :func:`domain_distance` (KID on features of a fixed,
seeded random network, because no pretrained weights are available offline);
:func:`fid_kid_inception` uses torch-fidelity's Inception features only when their weights exist
locally.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dasslab import runs

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------------
# Class names, subsets and the label-id -> train-id map
# --------------------------------------------------------------------------------------------------
def _cs_labels():
    from cityscapesscripts.helpers.labels import labels

    return labels


def _class_names() -> list[str]:
    try:  # the data engineer's module is the single source when present
        from dasslab import labels as dl

        names = getattr(dl, "CLASS_NAMES", None) or getattr(dl, "CLASSES", None)
        if names is not None and len(names) == 19:
            return list(names)
    except ImportError:
        pass
    by_train = {lab.trainId: lab.name for lab in _cs_labels() if 0 <= lab.trainId < 255}
    return [by_train[i] for i in range(19)]


CLASS_NAMES: list[str] = _class_names()
#: SYNTHIA -> Cityscapes reporting: 16 shared classes (no terrain, truck, train) and the 13-class
#: variant that also drops wall, fence and pole.
SUBSETS: dict[int, list[str]] = {
    19: list(CLASS_NAMES),
    16: [c for c in CLASS_NAMES if c not in ("terrain", "truck", "train")],
    13: [c for c in CLASS_NAMES if c not in ("terrain", "truck", "train", "wall", "fence", "pole")],
}


def id_to_train_id_lut() -> np.ndarray:
    """A 256-entry lookup table: Cityscapes label id -> train id (255 for every void id)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in _cs_labels():
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else IGNORE_INDEX
    return lut


def _known_label_ids() -> np.ndarray:
    return np.array(sorted(lab.id for lab in _cs_labels() if lab.id >= 0))


# --------------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------------
class ConfusionMatrix:
    """Dataset-level confusion matrix over train ids.

    Rows are ground truth (0..C-1; pixels equal to ``ignore_index`` are skipped), columns are
    predictions 0..C-1 plus one extra *void* column for any prediction outside 0..C-1 (e.g. 255 or a
    void label id). ``iou()`` / ``miou()`` / ``pixel_accuracy()`` return fractions in [0, 1].
    """

    def __init__(
        self, num_classes: int = 19, ignore_index: int = IGNORE_INDEX, class_names: list[str] | None = None
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if class_names is None:
            class_names = CLASS_NAMES if num_classes == 19 else [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.class_names = list(class_names)
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pred, gt) -> ConfusionMatrix:
        """Add a prediction / ground-truth pair (any shape, same shape; torch or numpy)."""
        C = self.num_classes
        if isinstance(pred, np.ndarray):
            pred = torch.from_numpy(np.ascontiguousarray(pred))
        if isinstance(gt, np.ndarray):
            gt = torch.from_numpy(np.ascontiguousarray(gt))
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
        pred = pred.reshape(-1).long()
        gt = gt.to(pred.device).reshape(-1).long()
        keep = gt != self.ignore_index
        bad = keep & ((gt < 0) | (gt >= C))
        if bool(bad.any()):
            vals = sorted(set(gt[bad].unique().tolist()))[:10]
            raise ValueError(f"ground truth holds ids {vals} outside 0..{C - 1} and != {self.ignore_index}")
        gt, pred = gt[keep], pred[keep]
        pred = torch.where((pred >= 0) & (pred < C), pred, torch.full_like(pred, C))
        counts = torch.bincount(gt * (C + 1) + pred, minlength=C * (C + 1))
        self.matrix += counts.cpu().numpy().reshape(C, C + 1)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices with different class counts")
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    @property
    def confusion(self) -> np.ndarray:
        """(C, C) ground truth x prediction counts, without the void column."""
        return self.matrix[:, : self.num_classes].copy()

    @property
    def void(self) -> np.ndarray:
        """Per ground-truth class, pixels predicted as void."""
        return self.matrix[:, self.num_classes].copy()

    def iou(self) -> np.ndarray:
        """Per-class IoU (fraction); NaN for a class absent from both ground truth and prediction."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m[:, : self.num_classes])
        fn = m.sum(1) - tp
        fp = m[:, : self.num_classes].sum(0) - tp
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)

    def miou(self, classes: int | list[str] | None = None) -> float:
        """NaN-ignoring mean IoU over all classes, a named subset, or a subset size (16 / 13)."""
        iou = self.iou()
        if classes is not None:
            iou = iou[self._subset_index(classes)]
        valid = iou[~np.isnan(iou)]
        return float(valid.mean()) if valid.size else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix[:, : self.num_classes]) / total) if total else float("nan")

    def _subset_index(self, classes) -> list[int]:
        if isinstance(classes, int):
            if classes not in SUBSETS or self.num_classes != 19:
                raise ValueError(
                    f"class subset {classes} needs 19 Cityscapes classes; known: {sorted(SUBSETS)}"
                )
            classes = SUBSETS[classes]
        unknown = [c for c in classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; known: {self.class_names}")
        return [self.class_names.index(c) for c in classes]

    def summary(self) -> dict:
        """Percent scores: mIoU, acc, per_class, the 16/13-class means (19 classes), confusion."""
        iou = self.iou() * 100.0
        out = {
            "mIoU": self.miou() * 100.0,
            "acc": self.pixel_accuracy() * 100.0,
            "per_class": {n: float(v) for n, v in zip(self.class_names, iou)},
            "confusion": self.confusion,
            "void": self.void,
        }
        if self.num_classes == 19:
            out["mIoU16"] = self.miou(16) * 100.0
            out["mIoU13"] = self.miou(13) * 100.0
        return out


# --------------------------------------------------------------------------------------------------
# Scoring prediction files in the official format
# --------------------------------------------------------------------------------------------------
_GT_SUFFIX = "_gtFine_labelIds.png"


def _frame_key(gt_name: str) -> str:
    return gt_name[: -len(_GT_SUFFIX)]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return arr


def score_prediction_folder(pred_dir, gt_dir) -> dict:
    """Score official-format predictions (label-id PNGs) against ``*_gtFine_labelIds.png`` files.

    Every ground-truth file under ``gt_dir`` (recursive) needs exactly one prediction under
    ``pred_dir`` (recursive) whose name starts with the same ``<city>_<seq>_<frame>`` key, as the
    official evaluator matches them. Returns percent scores like :meth:`ConfusionMatrix.summary`
    plus ``n_images``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "--pred-dir"), (gt_dir, "--gt-dir")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} {d} is not a directory")
    gts = sorted(gt_dir.rglob("*" + _GT_SUFFIX))
    if not gts:
        raise FileNotFoundError(f"no *{_GT_SUFFIX} files under {gt_dir}")
    preds: dict[str, list[Path]] = {}
    key_re = re.compile(r"^(.+?_\d+_\d+)(?=[_.])")
    for p in pred_dir.rglob("*.png"):
        if "_gtFine_" in p.name:
            continue
        m = key_re.match(p.name)
        if m:
            preds.setdefault(m.group(1), []).append(p)
    lut = id_to_train_id_lut()
    known = _known_label_ids()
    cm = ConfusionMatrix(19)
    for gt_path in gts:
        key = _frame_key(gt_path.name)
        cands = preds.get(key, [])
        if not cands:
            raise FileNotFoundError(
                f"no prediction for ground truth {gt_path} (expected {key}*.png under {pred_dir})"
            )
        if len(cands) > 1:
            raise ValueError(f"several predictions for ground truth {gt_path}: {sorted(map(str, cands))}")
        pred_path = cands[0]
        gt = _read_png(gt_path)
        pred = _read_png(pred_path)
        if pred.ndim != 2:
            raise ValueError(
                f"prediction {pred_path} has {pred.shape[-1]} channels; expected a single-channel label-id PNG"
            )
        if pred.shape != gt.shape:
            raise ValueError(
                f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]}, "
                f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]} (width x height)"
            )
        bad = np.setdiff1d(np.unique(gt), known)
        if bad.size:
            raise ValueError(f"ground truth {gt_path} holds unknown label ids {bad.tolist()[:10]}")
        gt_train = lut[gt.astype(np.int64)]
        # label ids beyond the table (e.g. 255 in a 16-bit PNG) are void predictions
        pred64 = pred.astype(np.int64)
        pred_train = np.where((pred64 >= 0) & (pred64 < 256), lut[np.clip(pred64, 0, 255)], IGNORE_INDEX)
        cm.update(pred_train, gt_train)
    out = cm.summary()
    out["n_images"] = len(gts)
    return out


def _json_ready(res: dict) -> dict:
    out = {}
    for k, v in res.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, dict):
            v = {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv) for kk, vv in v.items()}
        elif isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def format_scores(res: dict) -> str:
    lines = [f"{'class':<16}{'IoU %':>8}"]
    for name, v in res["per_class"].items():
        lines.append(f"{name:<16}{v:>8.2f}" if not math.isnan(v) else f"{name:<16}{'nan':>8}")
    lines.append(f"{'mIoU':<16}{res['mIoU']:>8.2f}")
    for k in ("mIoU16", "mIoU13", "acc"):
        if k in res:
            lines.append(f"{k:<16}{res[k]:>8.2f}")
    return "\n".join(lines)


def _cmd_evaluate(args) -> int:
    # FileNotFoundError / ValueError name the file at fault; dasslab.cli prints them as errors
    res = score_prediction_folder(args.pred_dir, args.gt_dir)
    print(format_scores(res))
    print(f"images: {res['n_images']}")
    if args.json:
        runs.atomic_save_json(Path(args.json), _json_ready(res))
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    """Adds ``dasslab evaluate --pred-dir DIR --gt-dir DIR [--json OUT]``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score official-format prediction PNGs (Cityscapes label ids) against gtFine",
        description="Score a folder of prediction PNGs in the official Cityscapes format (label ids), "
        "matched to *_gtFine_labelIds.png by the <city>_<seq>_<frame> key (recursive).",
    )
    p.add_argument("--pred-dir", required=True, type=Path, help="folder of prediction PNGs (label ids)")
    p.add_argument("--gt-dir", required=True, type=Path, help="folder with *_gtFine_labelIds.png (recursive)")
    p.add_argument("--json", type=Path, default=None, help="write the scores (percent, key mIoU) here")
    p.set_defaults(func=_cmd_evaluate)


# --------------------------------------------------------------------------------------------------
# Translation quality
# --------------------------------------------------------------------------------------------------
def label_consistency(ref_model, translated_dataset, batch_size: int = 16, device=None) -> float:
    """mIoU (percent) of a target-trained segmenter on translated images against the source labels.

    High when a translation keeps the scene's semantics *and* looks like the target domain to a
    target-trained model.
    """
    from dasslab import seg

    return seg.evaluate(ref_model, translated_dataset, batch_size=batch_size, device=device)["mIoU"]


class FixedFeatureNet(nn.Module):
    """A fixed random-init convolutional feature extractor (``dasslab-randconv-v1``).

    No pretrained network is available offline, so domain distance uses features of a network
    whose weights come from a fixed seed (independent of the global RNG): three stages of 3x3
    convolutions (filters zero-mean and unit-norm, so they respond to texture, edges and colour
    contrasts rather than brightness alone), ReLU and 2x average pooling. Per stage it keeps the
    spatial mean and standard deviation of every channel (first and second order texture statistics,
    a diagonal Gram). Appended: the image's per-channel mean and std, and the mean absolute Laplacian
    per channel (sharpness / sensor noise). Images are resized to 64x128 first. Random convolutional
    features are a known working basis for texture statistics; they are not perceptual like Inception
    and the scale of KID values is not comparable with published KID numbers.
    """

    NAME = "dasslab-randconv-v1"
    SIZE = (64, 128)

    def __init__(self, widths=(16, 32, 64), seed: int = 20240607):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        convs, cin = [], 3
        for w in widths:
            k = torch.randn(w, cin, 3, 3, generator=g)
            k = k - k.mean(dim=(1, 2, 3), keepdim=True)
            k = k / k.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            conv = nn.Conv2d(cin, w, 3, padding=1, bias=False, padding_mode="reflect")
            conv.weight.data.copy_(k)
            conv.weight.requires_grad_(False)
            convs.append(conv)
            cin = w
        self.convs = nn.ModuleList(convs)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("lap", lap.view(1, 1, 3, 3).repeat(3, 1, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=self.SIZE, mode="bilinear", align_corners=False, antialias=True)
        feats = [
            x.mean((2, 3)),
            x.std((2, 3)),
            F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.lap, groups=3).abs().mean((2, 3)),
        ]
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
            feats += [h.mean((2, 3)), h.std((2, 3))]
            h = F.avg_pool2d(h, 2)
        return torch.cat(feats, 1)


def _as_image_batches(images, batch_size: int):
    """Yields (B,3,H,W) float tensors in [-1,1] from a tensor, a list of tensors/arrays or a dataset."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (N,3,H,W), got shape {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    buf = []
    for i in range(len(images)):
        item = images[i]
        if isinstance(item, dict):
            item = item["image"]
        if isinstance(item, np.ndarray):  # uint8 HxWx3
            item = torch.from_numpy(item).permute(2, 0, 1).float() / 127.5 - 1.0
        buf.append(item)
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def image_features(images, batch_size: int = 64, net: FixedFeatureNet | None = None) -> np.ndarray:
    """Features of :class:`FixedFeatureNet` for images in [-1, 1] (tensor, list or dataset)."""
    net = net or FixedFeatureNet()
    net.eval()
    out = [net(b).double().numpy() for b in _as_image_batches(images, batch_size)]
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out)


def kid_from_features(
    fa: np.ndarray, fb: np.ndarray, n_subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance estimator on given features: unbiased MMD^2 with the polynomial
    kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; returns (mean, std)."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature shapes {fa.shape} and {fb.shape} do not match")
    m = min(subset_size, len(fa), len(fb))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(fa)} and {len(fb)}")
    d = fa.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_subsets):
        x = fa[rng.choice(len(fa), m, replace=False)]
        y = fb[rng.choice(len(fb), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def _standardize(fa: np.ndarray, fb: np.ndarray):
    """Scale every feature by the reference set's (``fb``) mean and std, so KIDs against one
    reference (the real target images) are comparable across the sets compared with it."""
    mu, sd = fb.mean(0), fb.std(0)
    # floor: a feature (nearly) constant in the reference must not dominate the distance
    sd = np.maximum(sd, np.median(sd)) + 1e-6
    return (fa - mu) / sd, (fb - mu) / sd


def domain_distance(
    images_a,
    images_b,
    n_subsets: int = 50,
    subset_size: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """KID between two image sets on :class:`FixedFeatureNet` features; ``images_b`` is the reference
    (e.g. real target images), ``images_a`` the set judged (e.g. translated images).

    Features are standardised by the reference's mean and std (random features have arbitrary
    scales), so scores against one reference compare across methods. Subsets hold
    ``subset_size`` images (default: half the smaller set, at most 1000) so that ``kid_std`` shows
    the estimator's spread. ~0 for two samples of one distribution. Returns
    ``{"kid", "kid_std", "feature", "n_a", "n_b"}``.
    """
    net = FixedFeatureNet()
    fa = image_features(images_a, batch_size, net)
    fb = image_features(images_b, batch_size, net)
    fa, fb = _standardize(fa, fb)
    if subset_size is None:
        subset_size = min(1000, max(2, min(len(fa), len(fb)) // 2))
    kid, kid_std = kid_from_features(fa, fb, n_subsets=n_subsets, subset_size=subset_size, seed=seed)
    return {"kid": kid, "kid_std": kid_std, "feature": FixedFeatureNet.NAME, "n_a": len(fa), "n_b": len(fb)}


INCEPTION_ENV = "DASSLAB_INCEPTION_WEIGHTS"


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.batches = torch.cat(list(_as_image_batches(images, 64)))

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return ((self.batches[i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fid_kid_inception(images_a, images_b, weights_path=None, fallback: bool = True, **kw) -> dict:
    """FID and KID on torch-fidelity's Inception features, when the weights are present locally.

    ``weights_path`` (or the ``DASSLAB_INCEPTION_WEIGHTS`` environment variable) names the
    ``pt_inception-2015-12-05`` weights file torch-fidelity would download. Without it (or without
    torch-fidelity, the optional ``fid`` extra) nothing is downloaded: with ``fallback`` the result is
    :func:`domain_distance` (``metric = dasslab-randconv-v1``, ``fid = nan``) and a ``message``
    saying so (also issued as a warning); without ``fallback`` a ``FileNotFoundError``.
    """
    path = weights_path or os.environ.get(INCEPTION_ENV)
    reason = None
    if not path:
        reason = (
            f"Inception weights for torch-fidelity are missing (pass weights_path= or set "
            f"{INCEPTION_ENV}); nothing is downloaded"
        )
    elif not Path(path).is_file():
        reason = f"Inception weights file {path} does not exist"
    else:
        try:
            import torch_fidelity
        except ImportError:
            reason = "torch-fidelity is not installed (pip install 'dasslab[fid]')"
    if reason is None:
        import torch_fidelity
        from torch_fidelity.defaults import DEFAULTS

        ia, ib = _Uint8Images(images_a), _Uint8Images(images_b)
        # torch-fidelity >= 0.4 takes device=, older releases cuda=
        dev = (
            {"device": "cuda" if torch.cuda.is_available() else "cpu"}
            if "device" in DEFAULTS
            else {"cuda": torch.cuda.is_available()}
        )
        res = torch_fidelity.calculate_metrics(
            input1=ia,
            input2=ib,
            fid=True,
            kid=True,
            feature_extractor_weights_path=str(path),
            verbose=False,
            cache=False,
            kid_subset_size=min(1000, len(ia), len(ib)),
            **{**dev, **kw},
        )
        return {
            "metric": "inception",
            "fid": float(res["frechet_inception_distance"]),
            "kid": float(res["kernel_inception_distance_mean"]),
            "kid_std": float(res["kernel_inception_distance_std"]),
        }
    message = f"{reason}: FID not computed; using KID on {FixedFeatureNet.NAME} features (metrics.domain_distance) instead."
    if not fallback:
        raise FileNotFoundError(message)
    warnings.warn(message, stacklevel=2)
    res = domain_distance(images_a, images_b)
    return {
        "metric": FixedFeatureNet.NAME,
        "fid": float("nan"),
        "kid": res["kid"],
        "kid_std": res["kid_std"],
        "message": message,
    }
