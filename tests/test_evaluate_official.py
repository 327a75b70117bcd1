"""dasslab's scores equal the official Cityscapes evaluator on the same prediction files."""

import math

import numpy as np
import pytest
from PIL import Image

from dasslab import metrics

off = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
from cityscapesscripts.helpers.labels import labels as cs_labels

VALID_IDS = [lab.id for lab in cs_labels if 0 <= lab.trainId < 255]
VOID_IDS = [lab.id for lab in cs_labels if lab.id >= 0 and not (0 <= lab.trainId < 255)]


def _write_split(tmp_path, seed=0, n=4, H=24, W=40):
    """GT labelIds (+ instanceIds, which the official code reads) and predictions with void ids."""
    rng = np.random.default_rng(seed)
    gt_dir, pred_dir = tmp_path / "gtFine" / "val", tmp_path / "pred"
    # classes never in GT: 'train' (id 31) only in predictions -> IoU 0; 'bus' (28) nowhere -> NaN
    gt_ids = [i for i in VALID_IDS if i not in (31, 28)] + VOID_IDS
    pred_ids = [i for i in VALID_IDS if i != 28] + [0, 4, 9, 14]  # some void label ids predicted
    gts, preds = [], []
    for k in range(n):
        city = ["aachen", "bremen"][k % 2]
        key = f"{city}_{k:06d}_{19 + k:06d}"
        gt = rng.choice(gt_ids, size=(H, W)).astype(np.uint8)
        gt[: H // 3] = 23  # a big sky region: high IoU for one class
        pred = gt.copy()
        flip = rng.random((H, W)) < 0.35
        pred[flip] = rng.choice(pred_ids, size=int(flip.sum()))
        pred[gt == 33] = 0  # bicycle always predicted as a void id: IoU 0 via misses only
        (gt_dir / city).mkdir(parents=True, exist_ok=True)
        (pred_dir / city).mkdir(parents=True, exist_ok=True)
        g = gt_dir / city / f"{key}_gtFine_labelIds.png"
        Image.fromarray(gt).save(g)
        Image.fromarray(gt).save(gt_dir / city / f"{key}_gtFine_instanceIds.png")
        p = pred_dir / city / f"{key}_leftImg8bit.png"
        Image.fromarray(pred).save(p)
        gts.append(str(g))
        preds.append(str(p))
    return tmp_path / "gtFine", pred_dir, gts, preds


def _official(pred_dir, gts, tmp_path, monkeypatch, instances=True):
    # the official evaluator calls np.in1d, removed in NumPy 2.4
    if not hasattr(np, "in1d"):
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    args = off.args
    monkeypatch.setattr(args, "quiet", True)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "evalInstLevelScore", instances)
    monkeypatch.setattr(args, "predictionPath", str(pred_dir))
    monkeypatch.setattr(args, "predictionWalk", None)
    preds = [off.getPrediction(args, g) for g in gts]  # the official file matching
    return off.evaluateImgLists(preds, gts, args)


def test_matches_official_evaluator(tmp_path, monkeypatch):
    gt_root, pred_dir, gts, _ = _write_split(tmp_path)
    ref = _official(pred_dir, gts, tmp_path, monkeypatch)
    ours = metrics.score_prediction_folder(pred_dir, gt_root)
    assert ours["n_images"] == len(gts)
    checked = 0
    for name, iou in ours["per_class"].items():
        theirs = ref["classScores"][name]
        if math.isnan(theirs):
            assert math.isnan(iou), name
        else:
            assert iou / 100 == pytest.approx(theirs, abs=1e-9), name
            checked += 1
    assert checked >= 17
    assert math.isnan(ours["per_class"]["bus"])
    assert ours["per_class"]["train"] == 0.0
    assert ours["per_class"]["bicycle"] == 0.0
    assert ours["mIoU"] / 100 == pytest.approx(ref["averageScoreClasses"], abs=1e-9)


def test_void_prediction_counts_as_miss(tmp_path, monkeypatch):
    """A valid GT pixel predicted as a void id lowers that class's IoU, in both evaluators."""
    gt_root, pred_dir, gts, _ = _write_split(tmp_path, seed=3, n=2)
    before = metrics.score_prediction_folder(pred_dir, gt_root)["per_class"]["sky"]
    for p in pred_dir.rglob("*.png"):
        arr = np.array(Image.open(p))
        arr[0, :10] = 0  # those pixels are sky (id 23) in GT
        Image.fromarray(arr).save(p)
    ref = _official(pred_dir, gts, tmp_path, monkeypatch)
    after = metrics.score_prediction_folder(pred_dir, gt_root)["per_class"]["sky"]
    assert after < before
    assert after / 100 == pytest.approx(ref["classScores"]["sky"], abs=1e-9)


def test_in_memory_evaluation_equals_official_on_written_predictions(tmp_path, monkeypatch):
    """seg.evaluate on a Cityscapes-layout set == our folder scoring == the official evaluator on
    the prediction files seg.write_predictions writes."""
    import torch

    toystreets = pytest.importorskip("dasslab.toystreets")
    from dasslab import datasets, seg

    root = tmp_path / "toy"
    toystreets.generate(root, size=(32, 64), n_train=6, n_val=4, seed=0, conditions=[], progress=False)
    val = datasets.SegFolder(root / "cityscapes", "cityscapes", split="val")
    torch.manual_seed(0)
    model = seg.build_segmenter("unet-small", width=4, depth=2)
    train = datasets.SegFolder(root / "cityscapes", "cityscapes", split="train")
    model, _ = seg.train_segmenter(
        model, train, seg.TrainConfig(iters=5, batch_size=4, lr=3e-2), device="cpu"
    )
    ours = seg.evaluate(model, val)
    pred_dir = seg.write_predictions(model, val, tmp_path / "pred")
    gt_dir = root / "cityscapes" / "gtFine" / "val"
    folder = metrics.score_prediction_folder(pred_dir, gt_dir)
    gts = sorted(str(p) for p in gt_dir.rglob("*_gtFine_labelIds.png"))
    ref = _official(pred_dir, gts, tmp_path, monkeypatch, instances=False)  # ToyStreets has no instanceIds
    for name, iou in ours["per_class"].items():
        assert (math.isnan(iou) and math.isnan(folder["per_class"][name])) or iou == pytest.approx(
            folder["per_class"][name], abs=1e-9
        ), name
        theirs = ref["classScores"][name]
        assert (math.isnan(iou) and math.isnan(theirs)) or iou / 100 == pytest.approx(theirs, abs=1e-9), name
    assert ours["mIoU"] / 100 == pytest.approx(ref["averageScoreClasses"], abs=1e-9)
