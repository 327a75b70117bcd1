"""Label spaces: the 19 Cityscapes train classes and how each dataset's raw ids map onto them.

Everything is derived from ``cityscapesscripts.helpers.labels`` (the official definition) so the
ids, names and colours can never drift from what the Cityscapes evaluator uses. Conversions are
256/65536-entry lookup tables applied in one numpy indexing step; a raw value the table does not
define is an error naming the values (and the file), never silently mapped to garbage.

Raw encodings handled here:

* Cityscapes ``*_gtFine_labelIds.png`` and GTA5 ``labels/*.png``: Cityscapes label ids 0..33
  (255 also accepted as "unlabelled"; the python table's license-plate id -1 -> 255).
* Cityscapes / ACDC ``*_labelTrainIds.png``: train ids 0..18 and 255.
* SYNTHIA-RAND-CITYSCAPES ``GT/LABELS/*.png``: 16-bit PNG, class id in the *first* channel in
  RGB/PNG order, which is the channel OpenCV returns *last* (``cv2.imread(f, -1)[:, :, -1]``,
  as DAFormer/mmseg convert it; OpenCV reorders to BGR). The second channel holds instance ids.
  Ids follow SYNTHIA's README (0 void .. 22 lanemarking); see :data:`SYNTHIA_ID_TO_TRAIN`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
NUM_CLASSES = 19

_TRAIN_LABELS = sorted((lab for lab in _CS_LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)
assert [lab.trainId for lab in _TRAIN_LABELS] == list(range(NUM_CLASSES)), "cityscapesscripts changed its train ids"

#: class names indexed by train id ("road", "sidewalk", ..., "bicycle")
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
CLASSES = CLASS_NAMES
#: (19, 3) uint8 Cityscapes colours indexed by train id
PALETTE: np.ndarray = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)
PALETTE.setflags(write=False)
#: train id -> Cityscapes label id (for writing GTA5 / ``_labelIds`` files)
TRAIN_TO_ID: np.ndarray = np.array([lab.id for lab in _TRAIN_LABELS], dtype=np.uint8)
TRAIN_TO_ID.setflags(write=False)
#: label id written for ignored pixels (Cityscapes "unlabeled")
UNLABELED_ID = next(lab.id for lab in _CS_LABELS if lab.name == "unlabeled")

#: SYNTHIA-RAND-CITYSCAPES class ids (README.txt of the release) -> Cityscapes train ids.
#: terrain (16), truck (18) and train (20) are listed in SYNTHIA's README but absent from the
#: RAND-CITYSCAPES images; they are mapped like every published loader does. void (0),
#: parking-slot (13), road-work (14) and lanemarking (22) -> ignore.
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    0: IGNORE_INDEX, 1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17,
    13: IGNORE_INDEX, 14: IGNORE_INDEX, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3,
    22: IGNORE_INDEX,
}
#: SYNTHIA -> Cityscapes is scored on 16 shared classes (no terrain, truck, train) ...
SUBSET_16: tuple[int, ...] = tuple(i for i, n in enumerate(CLASS_NAMES) if n not in ("terrain", "truck", "train"))
#: ... and in some papers on 13 (also without wall, fence, pole).
SUBSET_13: tuple[int, ...] = tuple(i for i in SUBSET_16 if CLASS_NAMES[i] not in ("wall", "fence", "pole"))
SUBSETS: dict[int, tuple[int, ...]] = {19: tuple(range(NUM_CLASSES)), 16: SUBSET_16, 13: SUBSET_13}

_INVALID = -1


def _table(size: int, mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(size, _INVALID, dtype=np.int16)
    for k, v in mapping.items():
        lut[k] = v
    lut.setflags(write=False)
    return lut


#: Cityscapes label id (0..33, 255) -> train id; every other value is invalid
ID_TO_TRAIN_LUT: np.ndarray = _table(
    256,
    {**{lab.id: (lab.trainId if 0 <= lab.trainId < IGNORE_INDEX else IGNORE_INDEX)
        for lab in _CS_LABELS if 0 <= lab.id < 256},
     IGNORE_INDEX: IGNORE_INDEX},
)
#: train id (0..18, 255) -> itself; anything else is invalid (checks ``_labelTrainIds`` files)
TRAIN_LUT: np.ndarray = _table(256, {**{i: i for i in range(NUM_CLASSES)}, IGNORE_INDEX: IGNORE_INDEX})
#: SYNTHIA id (0..22) -> train id; 16-bit values beyond are invalid
SYNTHIA_LUT: np.ndarray = _table(65536, SYNTHIA_ID_TO_TRAIN)
#: train id (0..18, 255) -> Cityscapes label id
TRAIN_TO_ID_LUT: np.ndarray = _table(256, {**{i: int(TRAIN_TO_ID[i]) for i in range(NUM_CLASSES)},
                                          IGNORE_INDEX: UNLABELED_ID})


def apply_lut(lut: np.ndarray, raw, what: str, path: str | Path | None = None) -> np.ndarray:
    """Map ``raw`` through ``lut`` into uint8; values the table does not define raise ValueError."""
    raw = _as_numpy(raw)
    if raw.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected an integer label array, got dtype {raw.dtype}"
                         + (f" in {path}" if path else ""))
    flat = raw.astype(np.int64, copy=False)
    outside = (flat < 0) | (flat >= lut.shape[0])
    if outside.any():
        _raise_bad(what, np.unique(flat[outside]), path)
    out = lut[flat]
    bad = out == _INVALID
    if bad.any():
        _raise_bad(what, np.unique(flat[bad]), path)
    return out.astype(np.uint8)


def _raise_bad(what: str, values: np.ndarray, path) -> None:
    shown = ", ".join(str(int(v)) for v in values[:12]) + (" ..." if len(values) > 12 else "")
    where = f" in {path}" if path else ""
    raise ValueError(f"{what}: value(s) {shown}{where} are not in the table of valid ids")


def _as_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def label_ids_to_train(raw, path: str | Path | None = None) -> np.ndarray:
    """Cityscapes / GTA5 label ids -> train ids (uint8, 255 = ignore)."""
    return apply_lut(ID_TO_TRAIN_LUT, raw, "Cityscapes label ids", path)


def check_train_ids(raw, path: str | Path | None = None) -> np.ndarray:
    """A ``_labelTrainIds`` array as uint8, after checking every value is 0..18 or 255."""
    return apply_lut(TRAIN_LUT, raw, "train ids", path)


def synthia_to_train(raw, path: str | Path | None = None) -> np.ndarray:
    """SYNTHIA-RAND-CITYSCAPES ids -> train ids.

    ``raw`` is the id plane (H, W), or the decoded 16-bit PNG (H, W, C) in file (RGB) order, whose
    channel 0 holds the class id (the channel ``cv2.imread`` returns last).
    """
    raw = _as_numpy(raw)
    if raw.ndim == 3:
        raw = raw[..., 0]
    return apply_lut(SYNTHIA_LUT, raw, "SYNTHIA ids", path)


def train_to_label_ids(train, path: str | Path | None = None) -> np.ndarray:
    """Train ids -> Cityscapes label ids (255 -> 0 "unlabeled"): how GTA5 labels are stored."""
    return apply_lut(TRAIN_TO_ID_LUT, train, "train ids", path)


def subset_lut(subset: int | tuple[int, ...]) -> np.ndarray:
    """A table train id -> index within a class subset (16 or 13 classes); other classes -> 255."""
    ids = SUBSETS[subset] if isinstance(subset, int) else tuple(subset)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(ids)] = np.arange(len(ids), dtype=np.uint8)
    return lut


def class_index(name: str) -> int:
    """Train id of a class name; unknown names raise ValueError listing the valid ones."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; classes: {', '.join(CLASS_NAMES)}") from None


_COLOUR_LUT = np.zeros((256, 3), dtype=np.uint8)  # 255 and unused ids -> black ("unlabeled")
_COLOUR_LUT[:NUM_CLASSES] = PALETTE
_COLOUR_LUT.setflags(write=False)


def colourise(label) -> np.ndarray:
    """Train ids (..., H, W) -> RGB uint8 (..., H, W, 3) in the Cityscapes palette (255 -> black)."""
    arr = _as_numpy(label)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"colourise expects integer train ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr > 255) | ((arr >= NUM_CLASSES) & (arr != IGNORE_INDEX))
    if bad.any():
        _raise_bad("train ids", np.unique(arr[bad]), None)
    return _COLOUR_LUT[arr]


colorize = colourise
