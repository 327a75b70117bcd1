"""One reader for every real on-disk layout, so translated sets and benchmarks read the same way.

``SegFolder`` knows four presets (GTA5, SYNTHIA, Cityscapes, ACDC), converts each raw label encoding
to Cityscapes train ids through :mod:`dasslab.labels`, and returns images in [-1, 1]. ToyStreets is
written in these same layouts, so the benchmark exercises the real readers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dasslab import labels as L
from dasslab.pngio import read_png

if TYPE_CHECKING:
    import pandas as pd

PRESETS = ("gta5", "synthia", "cityscapes", "acdc")
CONDITIONS = ("fog", "night", "rain", "snow")
_GTA5_MAT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}


@dataclass(frozen=True)
class Entry:
    name: str
    image: Path
    label: Path | None
    kind: str | None  # "ids" (Cityscapes label ids), "train" (train ids), "synthia" (16-bit ids)


# --------------------------------------------------------------------------- file helpers


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e


def _read_label(entry: Entry) -> np.ndarray:
    """Train ids (uint8, H x W) of one entry's label file."""
    path = entry.label
    if entry.kind == "synthia":
        try:
            raw = read_png(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"label file {path} does not exist") from None
        return L.synthia_to_train(raw, path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B"):
                raise ValueError(f"label file {path} has mode {im.mode}; expected one channel of ids")
            raw = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OSError(f"cannot read label file {path}: {e}") from e
    if entry.kind == "ids":
        return L.label_ids_to_train(raw, path)
    return L.check_train_ids(raw, path)


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OSError(f"cannot read {path}: {e}") from e


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    return path


def _split_stems(root: Path, split: str | None) -> list[str] | None:
    """Stems listed by ``<split>.txt`` (one per line) or GTA5's ``split.mat``; None = no split."""
    if split is None:
        return None
    txt = root / f"{split}.txt"
    if txt.is_file():
        stems = [Path(s.strip()).stem for s in txt.read_text().splitlines() if s.strip()]
        if not stems:
            raise ValueError(f"split file {txt} lists no images")
        return stems
    mat = root / "split.mat"
    if mat.is_file() and split in _GTA5_MAT_KEYS:
        import scipy.io

        try:
            ids = scipy.io.loadmat(mat)[_GTA5_MAT_KEYS[split]]
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"cannot read {_GTA5_MAT_KEYS[split]} from split file {mat}: {e}") from e
        return [f"{int(i):05d}" for i in np.asarray(ids).ravel()]
    raise FileNotFoundError(
        f"split {split!r} asked for, but neither {txt} nor {mat} exists (use split=None for every image)"
    )


# --------------------------------------------------------------------------- layouts


def _scan_gta5(root: Path, split, condition, with_labels) -> list[Entry]:
    imgs = _require_dir(root / "images", "GTA5 images")
    lbls = root / "labels"
    if with_labels:
        _require_dir(lbls, "GTA5 labels")
    stems = _split_stems(root, split)
    if stems is None:
        files = sorted(imgs.glob("*.png"))
    else:
        files = [imgs / f"{s}.png" for s in stems]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"split {split!r} lists images that do not exist: {', '.join(missing[:5])}")
    return [Entry(f.stem, f, lbls / f.name if with_labels else None, "ids" if with_labels else None) for f in files]


def _scan_synthia(root: Path, split, condition, with_labels) -> list[Entry]:
    imgs = _require_dir(root / "RGB", "SYNTHIA RGB")
    lbls = root / "GT" / "LABELS"
    if with_labels:
        _require_dir(lbls, "SYNTHIA GT/LABELS")
    stems = _split_stems(root, split)
    files = sorted(imgs.glob("*.png")) if stems is None else [imgs / f"{s}.png" for s in stems]
    return [Entry(f.stem, f, lbls / f.name if with_labels else None, "synthia" if with_labels else None)
            for f in files]


def _splits(base: Path, split: str | None) -> list[Path]:
    if split is not None:
        return [_require_dir(base / split, f"split {split!r}")]
    # every split folder; ACDC's unlabelled reference views (train_ref/, ...) are not a split
    found = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.endswith("_ref"))
    if not found:
        raise FileNotFoundError(f"{base} holds no split folders (train/, val/, ...)")
    return found


def _paired_label(gt_dir: Path, stem: str, suffixes: Sequence[tuple[str, str]]) -> tuple[Path, str]:
    for suffix, kind in suffixes:
        p = gt_dir / f"{stem}{suffix}"
        if p.is_file():
            return p, kind
    want = " or ".join(f"{stem}{s}" for s, _ in suffixes)
    raise FileNotFoundError(f"image has no label: expected {gt_dir / want}")


def _scan_cityscapes(root: Path, split, condition, with_labels) -> list[Entry]:
    base = _require_dir(root / "leftImg8bit", "Cityscapes leftImg8bit")
    gt = root / "gtFine"
    if with_labels:
        _require_dir(gt, "Cityscapes gtFine")
    out = []
    for sdir in _splits(base, split):
        for f in sorted(sdir.glob("*/*_leftImg8bit.png")):
            stem = f.name[: -len("_leftImg8bit.png")]
            if with_labels:
                lab, kind = _paired_label(gt / sdir.name / f.parent.name, stem,
                                          [("_gtFine_labelTrainIds.png", "train"), ("_gtFine_labelIds.png", "ids")])
            else:
                lab, kind = None, None
            out.append(Entry(stem, f, lab, kind))
    return out


def _scan_acdc(root: Path, split, condition, with_labels) -> list[Entry]:
    base = _require_dir(root / "rgb_anon", "ACDC rgb_anon")
    gt = root / "gt"
    if with_labels:
        _require_dir(gt, "ACDC gt")
    if condition is None:
        conds = sorted(p.name for p in base.iterdir() if p.is_dir())
    else:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown ACDC condition {condition!r}; conditions: {', '.join(CONDITIONS)}")
        conds = [condition]
    out = []
    for cond in conds:
        cdir = _require_dir(base / cond, f"ACDC condition {cond!r}")
        for sdir in _splits(cdir, split):
            for f in sorted(sdir.glob("*/*_rgb_anon.png")):
                stem = f.name[: -len("_rgb_anon.png")]
                if with_labels:
                    lab, kind = _paired_label(gt / cond / sdir.name / f.parent.name, stem,
                                              [("_gt_labelTrainIds.png", "train"), ("_gt_labelIds.png", "ids")])
                else:
                    lab, kind = None, None
                out.append(Entry(stem, f, lab, kind))
    return out


_SCANNERS = {"gta5": _scan_gta5, "synthia": _scan_synthia, "cityscapes": _scan_cityscapes, "acdc": _scan_acdc}


# --------------------------------------------------------------------------- transforms


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 (3, H, W) in [-1, 1]."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] tensors (3,H,W)/(B,3,H,W) -> uint8 (H,W,3)/(B,H,W,3); uint8 arrays pass through."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu().float()
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.movedim(-3, -1).numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be [-1, 1] tensors or uint8 arrays, got a {arr.dtype} array")
    return arr


class RandomCropFlip:
    """Random crop to ``size`` (H, W) and horizontal flip, the same for image and label.

    A side smaller than the crop is padded (image with 0 = mid grey, label with 255 = ignore).
    Randomness comes from torch's RNG, or from ``generator`` when given.
    """

    def __init__(self, size: tuple[int, int] | None = None, flip: bool = True, generator: torch.Generator | None = None):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.flip = flip
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, flip={self.flip})"

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=self.generator)) if high > 0 else 0

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None):
        if self.size is not None:
            ch, cw = self.size
            h, w = image.shape[-2:]
            ph, pw = max(0, ch - h), max(0, cw - w)
            if ph or pw:
                image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
                if label is not None:
                    label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=L.IGNORE_INDEX)
                h, w = image.shape[-2:]
            top, left = self._randint(h - ch), self._randint(w - cw)
            image = image[..., top:top + ch, left:left + cw]
            if label is not None:
                label = label[..., top:top + ch, left:left + cw]
        if self.flip and bool(torch.rand((), generator=self.generator) < 0.5):
            image = image.flip(-1)
            if label is not None:
                label = label.flip(-1)
        return image.contiguous(), None if label is None else label.contiguous()


# --------------------------------------------------------------------------- the reader


class SegFolder(torch.utils.data.Dataset):
    """Images and train-id labels of one dataset split on disk.

    ``preset`` picks the layout; ``split`` the split (folders for Cityscapes/ACDC, ``<split>.txt`` or
    ``split.mat`` for GTA5/SYNTHIA, None = everything); ``size`` (H, W) resizes (bilinear with
    antialiasing for images, nearest for labels); ``transform(image, label) -> (image, label)`` runs
    on tensors after that (e.g. :class:`RandomCropFlip`); ``cache`` keeps decoded arrays in memory.
    """

    def __init__(self, root, preset: str = "gta5", split: str | None = None, condition: str | None = None,
                 size: Sequence[int] | None = None, with_labels: bool = True,
                 transform: Callable | None = None, cache: bool = False, entries: list[Entry] | None = None):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        self.root = Path(root).expanduser().resolve()
        self.preset, self.split, self.condition = preset, split, condition
        self.size = None if size is None else (int(size[0]), int(size[1]))
        if self.size is not None and min(self.size) < 1:
            raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
        self.with_labels = with_labels
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        if entries is None:
            _require_dir(self.root, f"{preset} dataset root")
            entries = _SCANNERS[preset](self.root, split, condition, with_labels)
        entries = sorted(entries, key=lambda e: e.name)
        if not entries:
            where = f"{self.root} (preset {preset}, split {split}" + (f", condition {condition}" if condition else "") + ")"
            raise ValueError(f"empty dataset: no images found in {where}")
        names = [e.name for e in entries]
        dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
        if dup:
            raise ValueError(f"{self.root}: duplicate image names {dup[:5]}; names must be unique")
        if with_labels:
            missing = [e.label for e in entries if not e.label.is_file()]
            if missing:
                raise FileNotFoundError(f"image has no label: {missing[0]} does not exist"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.entries = entries

    def __repr__(self) -> str:
        extra = f", condition={self.condition!r}" if self.condition else ""
        return (f"SegFolder({str(self.root)!r}, preset={self.preset!r}, split={self.split!r}{extra}, "
                f"size={self.size}, n={len(self)})")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def subset(self, indices_or_names) -> SegFolder:
        """A SegFolder over some entries (indices or names), same settings."""
        by_name = {e.name: i for i, e in enumerate(self.entries)}
        idx = [by_name[k] if isinstance(k, str) else int(k) for k in indices_or_names]
        return SegFolder(self.root, self.preset, self.split, self.condition, self.size, self.with_labels,
                         self.transform, self.cache, entries=[self.entries[i] for i in idx])

    def take(self, n: int, seed: int = 0) -> SegFolder:
        """A seeded random subset of n items (n <= 0 or >= len: everything)."""
        if n <= 0 or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.subset(idx)

    # ---- decoding
    def _resize(self, image: np.ndarray | None, label: np.ndarray | None):
        if self.size is None:
            return image, label
        h, w = self.size
        if image is not None and image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, reducing_gap=None))
        if label is not None and label.shape[:2] != (h, w):
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        return image, label

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 H x W x 3 image, uint8 H x W train ids or None), resized, before the transform."""
        if i in self._cache:
            return self._cache[i]
        e = self.entries[i]
        image = _read_rgb(e.image)
        label = _read_label(e) if self.with_labels else None
        if label is not None and label.shape != image.shape[:2]:
            raise ValueError(f"label {e.label} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                             f"{e.image} is {image.shape[1]}x{image.shape[0]}")
        image, label = self._resize(image, label)
        if self.cache:
            self._cache[i] = (image, label)
        return image, label

    def read_label(self, i: int) -> np.ndarray:
        """Train ids of item i (uint8, resized) without decoding the image when not cached."""
        if not self.with_labels:
            raise ValueError(f"{self!r} was opened with with_labels=False")
        if i in self._cache:
            return self._cache[i][1]
        label = _read_label(self.entries[i])
        _, label = self._resize(None, label)
        return label

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        image, label = self.load(i)
        x = to_tensor(image)
        y = torch.from_numpy(label.astype(np.int64)) if label is not None else None
        if self.transform is not None:
            x, y = self.transform(x, y)
        item = {"image": x, "name": self.entries[i].name}
        if y is not None:
            item["label"] = y
        return item

    def verify(self) -> dict:
        """Read every file once: sizes match, labels decode to valid train ids. Returns counts."""
        n_px = np.zeros(L.NUM_CLASSES + 1, dtype=np.int64)
        for i, e in enumerate(self.entries):
            _, label = self.load(i)
            if label is not None:
                n_px += np.bincount(np.where(label == L.IGNORE_INDEX, L.NUM_CLASSES, label).ravel(),
                                    minlength=L.NUM_CLASSES + 1)
        return {"n": len(self), "pixels": n_px[:-1].tolist(), "ignored": int(n_px[-1])}

    def fingerprint(self) -> dict:
        """What identifies this dataset's content cheaply (for cached evaluations)."""
        import hashlib

        h = hashlib.sha1("\n".join(self.names).encode()).hexdigest()
        stamp = max((e.image.stat().st_mtime_ns for e in self.entries[:: max(1, len(self) // 64)]), default=0)
        out = {"type": "SegFolder", "root": str(self.root), "preset": self.preset, "split": self.split,
               "condition": self.condition, "size": self.size, "n": len(self), "names": h, "mtime": stamp,
               "transform": repr(self.transform) if self.transform is not None else None}
        tj = self.root / "translation.json"
        if tj.is_file():
            out["translation"] = hashlib.sha1(tj.read_bytes()).hexdigest()
        return out


def at_size(ds: SegFolder, size) -> SegFolder:
    """``ds`` read at ``size`` (H, W): the same object when its images already have that size, so the
    cached trainings keyed by its fingerprint are reused; a resizing copy otherwise ([] / None: as is)."""
    if not size or not len(ds):
        return ds
    size = (int(size[0]), int(size[1]))
    if ds.size == size or (ds.size is None and _image_size(ds.entries[0].image) == size):
        return ds
    return SegFolder(ds.root, ds.preset, ds.split, ds.condition, size, ds.with_labels, ds.transform, ds.cache,
                     entries=list(ds.entries))


# --------------------------------------------------------------------------- statistics


def class_stats(ds: SegFolder) -> pd.DataFrame:
    """Pixel counts per class (columns: the 19 class names + "ignore"), one row per image (index: name)."""
    import pandas as pd

    rows = np.zeros((len(ds), L.NUM_CLASSES + 1), dtype=np.int64)
    for i in range(len(ds)):
        lab = ds.read_label(i)
        rows[i] = np.bincount(np.where(lab == L.IGNORE_INDEX, L.NUM_CLASSES, lab).ravel(),
                              minlength=L.NUM_CLASSES + 1)
    return pd.DataFrame(rows, index=pd.Index(ds.names, name="name"), columns=[*L.CLASS_NAMES, "ignore"])


def _interior(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds a single class (border pixels excluded)."""
    lab = np.asarray(label)
    h, w = lab.shape
    out = np.zeros((h, w), bool)
    if h < 3 or w < 3:
        return out
    same = np.ones((h - 2, w - 2), bool)
    for dy in range(3):
        for dx in range(3):
            same &= lab[dy:dy + h - 2, dx:dx + w - 2] == lab[1:-1, 1:-1]
    out[1:-1, 1:-1] = same
    return out


def noise_level(image, label=None) -> float:
    """Sensor-noise sigma (0-255 units) of a uint8 image, robust to edges.

    The 3x3 Laplacian-difference kernel M (Immerkaer) cancels locally linear content, so its
    response is mostly noise: for Gaussian noise it is N(0, 36 sigma^2). The median absolute
    response (over pixels whose 3x3 window holds one class when ``label`` is given) ignores the
    edges that dominate a small image: sigma = median|I * M| / (0.6745 * 6).
    """
    x = np.asarray(image, dtype=np.float64)
    x = x.mean(-1) if x.ndim == 3 else x
    h, w = x.shape
    if h < 3 or w < 3:
        raise ValueError(f"noise_level needs at least 3x3 pixels, got {w}x{h}")
    lap = np.abs(x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:] - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1]
                 - 2 * x[1:-1, 2:] + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:])
    if label is not None:
        same = _interior(label)[1:-1, 1:-1]
        if same.any():
            lap = lap[same]
    return float(np.median(lap) / (0.6745 * 6))


def appearance_stats(ds: SegFolder, n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """How each class looks in a dataset: one row per (image, class present).

    Columns: name, class, pixels, r, g, b (mean colour, 0-255), gradient (mean |dI/dx| + |dI/dy| of
    the grey image over the class's interior pixels, i.e. texture without the class boundary; NaN
    when the class has no interior), noise (the image's noise_level inside classes).
    ``n`` images at most (a seeded sample) keep it cheap on large sets.
    """
    import pandas as pd

    sub = ds.take(n, seed) if n else ds
    rows = []
    for i in range(len(sub)):
        image, label = sub.load(i)
        if label is None:
            raise ValueError(f"appearance_stats needs labels; {sub!r} has none")
        img = image.astype(np.float32)
        grey = img.mean(-1)
        gx = np.zeros_like(grey)
        gy = np.zeros_like(grey)
        gx[:, :-1] = np.abs(np.diff(grey, axis=1))
        gy[:-1] = np.abs(np.diff(grey, axis=0))
        grad = gx + gy
        inner = _interior(label)  # texture, not the class boundary
        sigma = noise_level(image, label)
        flat = label.ravel()
        counts = np.bincount(flat, minlength=256)
        sums = np.stack([np.bincount(flat, weights=img[..., k].ravel(), minlength=256) for k in range(3)], -1)
        gsum = np.bincount(flat[inner.ravel()], weights=grad.ravel()[inner.ravel()], minlength=256)
        gcnt = np.bincount(flat[inner.ravel()], minlength=256)
        for c in np.nonzero(counts[: L.NUM_CLASSES])[0]:
            rows.append({"name": sub.names[i], "class": L.CLASS_NAMES[c], "pixels": int(counts[c]),
                         "r": sums[c, 0] / counts[c], "g": sums[c, 1] / counts[c], "b": sums[c, 2] / counts[c],
                         "gradient": gsum[c] / gcnt[c] if gcnt[c] else float("nan"), "noise": sigma})
    return pd.DataFrame(rows, columns=["name", "class", "pixels", "r", "g", "b", "gradient", "noise"])


# --------------------------------------------------------------------------- writing


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"bad image name {name!r}: names become file names and may not hold path separators")
    return name


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write a PNG atomically (temp name beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_translated(out_dir, names: Sequence[str], images, labels) -> Path:
    """Write images + train-id labels in GTA5 layout (labels stored as Cityscapes label ids).

    ``images``: [-1, 1] tensors (B,3,H,W) or uint8 arrays (B,H,W,3); ``labels``: (B,H,W) train ids.
    Each file lands atomically, so an interrupted call leaves only whole files (call it per batch).
    """
    out_dir = Path(out_dir)
    imgs = to_uint8(images)
    labs = L._as_numpy(labels)
    if imgs.ndim == 3:
        imgs, labs = imgs[None], labs[None]
    names = [_check_name(str(n)) for n in names]
    if not (len(names) == len(imgs) == len(labs)):
        raise ValueError(f"write_translated: {len(names)} names, {len(imgs)} images, {len(labs)} labels")
    if imgs.shape[-1] != 3 or imgs.ndim != 4:
        raise ValueError(f"write_translated: images must be (B,3,H,W) tensors or (B,H,W,3) uint8, got {imgs.shape}")
    if labs.shape != imgs.shape[:3]:
        raise ValueError(f"write_translated: labels {labs.shape} do not match images {imgs.shape[:3]}")
    for name, img, lab in zip(names, imgs, labs):
        ids = L.train_to_label_ids(lab, f"labels for {name}")
        save_png(out_dir / "images" / f"{name}.png", img)
        save_png(out_dir / "labels" / f"{name}.png", ids)
    return out_dir


# --------------------------------------------------------------------------- benchmarks


def _gta5_source(root: Path, kw: dict) -> dict[str, SegFolder]:
    """GTA5 as DASS uses it: train on every image; hold out the val split when one is on disk.

    ``train.txt`` (if present) fixes the training list. Otherwise source_train is every image not in
    the val split (``val.txt`` or ``split.mat`` valIds), and source_val that split; with no split
    files at all there is no source_val (nothing is evaluated on training images).
    """
    out = {}
    try:
        val = SegFolder(root, "gta5", split="val", **kw)
    except FileNotFoundError as e:
        if "split" not in str(e):
            raise
        val = None
    if (root / "train.txt").is_file():
        train = SegFolder(root, "gta5", split="train", **kw)
    else:
        train = SegFolder(root, "gta5", split=None, **kw)
        if val is not None:
            held = set(val.names)
            train = train.subset([n for n in train.names if n not in held])
    out["source_train"] = train
    if val is not None:
        out["source_val"] = val
    return out


def benchmark_sets(cfg, size=None, cache: bool | None = None) -> dict[str, SegFolder]:
    """The profile's datasets: source_train/val, target_train/val and <condition>_train/val.

    ``cfg`` is a runs.Config (or a dict with a ``data`` table). ToyStreets folders must have been
    generated (notebook 00 / ``dasslab data toystreets``); real datasets must sit under data.root.
    """
    data = cfg.get("data", cfg)
    dataset = data.get("dataset", "toystreets")
    root = Path(data["root"])
    size = size if size is not None else data.get("size")
    conds = list(data.get("conditions", []) or [])
    if cache is None:
        cache = bool(data.get("cache", size is not None and size[0] * size[1] <= 128 * 256))
    kw = {"size": size, "cache": cache}
    sets: dict[str, SegFolder] = {}

    if dataset == "toystreets":
        from dasslab import toystreets

        toystreets.check_generated(root, data)
        for sp in ("train", "val"):
            sets[f"source_{sp}"] = SegFolder(root / "gta5", "gta5", split=sp, **kw)
        for sp in ("train", "val"):
            sets[f"target_{sp}"] = SegFolder(root / "cityscapes", "cityscapes", split=sp, **kw)
        for c in conds:
            for sp in ("train", "val"):
                sets[f"{c}_{sp}"] = SegFolder(root / "acdc", "acdc", split=sp, condition=c, **kw)
        return sets

    n_train, n_val, seed = int(data.get("n_train", 0) or 0), int(data.get("n_val", 0) or 0), int(data.get("seed", 0))

    def lim(ds: SegFolder, sp: str) -> SegFolder:
        return ds.take(n_train if sp == "train" else n_val, seed)

    if dataset == "gta5-cityscapes":
        src = Path(data.get("source_root", root / "gta5"))
        sets.update(_gta5_source(src, kw))
        sets = {k: lim(v, k.rsplit("_", 1)[1]) for k, v in sets.items()}
        tgt = Path(data.get("target_root", root / "cityscapes"))
        for sp in ("train", "val"):
            sets[f"target_{sp}"] = lim(SegFolder(tgt, "cityscapes", split=sp, **kw), sp)
        acdc = Path(data.get("adverse_root", root / "acdc"))
    elif dataset == "cityscapes-acdc":
        src = Path(data.get("source_root", root / "cityscapes"))
        for sp in ("train", "val"):
            sets[f"source_{sp}"] = lim(SegFolder(src, "cityscapes", split=sp, **kw), sp)
        acdc = Path(data.get("target_root", root / "acdc"))
        for sp in ("train", "val"):
            sets[f"target_{sp}"] = lim(SegFolder(acdc, "acdc", split=sp, **kw), sp)
    else:
        raise ValueError(f"unknown data.dataset {dataset!r}; known: toystreets, gta5-cityscapes, cityscapes-acdc")
    for c in conds:
        for sp in ("train", "val"):
            sets[f"{c}_{sp}"] = lim(SegFolder(acdc, "acdc", split=sp, condition=c, **kw), sp)
    return sets
