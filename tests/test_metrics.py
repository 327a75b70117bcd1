import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dasslab import cli, metrics
from dasslab.metrics import ConfusionMatrix


def test_hand_computed_iou_and_accuracy():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]])
    cm = ConfusionMatrix(4).update(pred, gt)
    # class 0: tp 1, fp 1 (gt 2 -> 0), fn 1 (-> 1); class 1: tp 2, fp 1, fn 0; class 2: tp 1, fn 1, fp 0
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3)
    assert iou[1] == pytest.approx(2 / 3)
    assert iou[2] == pytest.approx(1 / 2)
    assert math.isnan(iou[3])  # absent from GT and prediction
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)  # ignored pixels are not counted
    assert cm.matrix.sum() == 6


def test_prediction_only_class_has_iou_zero_and_void_prediction_is_a_miss():
    gt = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 255, 2, 1])  # 255 = void prediction on a valid GT pixel
    cm = ConfusionMatrix(3).update(pred, gt)
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3)  # the void pixel is a miss for class 0
    assert iou[2] == 0.0  # predicted, never in GT
    assert cm.void.tolist() == [1, 0, 0]
    assert cm.confusion.shape == (3, 3)


def test_dataset_level_not_mean_of_images():
    a = ConfusionMatrix(2).update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))
    a.update(np.array([1]), np.array([0]))
    # one matrix over everything: class 0 IoU = 4 / 5, class 1 IoU = 0
    assert a.iou()[0] == pytest.approx(4 / 5)
    b = ConfusionMatrix(2).update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))
    b.merge(ConfusionMatrix(2).update(np.array([1]), np.array([0])))
    assert np.array_equal(a.matrix, b.matrix)


def test_all_ignored_and_bad_input():
    cm = ConfusionMatrix(3).update(np.zeros((2, 2)), np.full((2, 2), 255))
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(3), np.array([0, 7, 1]))


def test_class_subsets():
    assert len(metrics.SUBSETS[16]) == 16 and len(metrics.SUBSETS[13]) == 13
    assert "terrain" not in metrics.SUBSETS[16] and "pole" not in metrics.SUBSETS[13]
    gt = torch.arange(19).repeat(10)
    pred = gt.clone()
    pred[gt == 9] = 0  # terrain all wrong
    cm = ConfusionMatrix(19).update(pred, gt)
    assert cm.miou(16) > cm.miou()  # terrain (IoU 0) and road (hurt) partly outside the subset
    s = cm.summary()
    assert set(s) >= {"mIoU", "acc", "per_class", "mIoU16", "mIoU13", "confusion"}
    with pytest.raises(ValueError, match="unknown class"):
        cm.miou(["road", "nope"])


# ------------------------------------------------------------------------- the evaluate command
def _write(tmp_path, key="aachen_000001_000019", shape=(8, 12), pred_shape=None):
    gt_dir, pred_dir = tmp_path / "gt" / "aachen", tmp_path / "pred" / "sub"
    gt_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    gt = np.full(shape, 7, np.uint8)
    gt[: shape[0] // 2] = 23
    Image.fromarray(gt).save(gt_dir / f"{key}_gtFine_labelIds.png")
    pred = np.full(pred_shape or shape, 7, np.uint8)
    Image.fromarray(pred).save(pred_dir / f"{key}_leftImg8bit.png")
    return tmp_path / "pred", tmp_path / "gt"


def test_cli_evaluate_writes_json(tmp_path, capsys):
    pred, gt = _write(tmp_path)
    out = tmp_path / "res.json"
    assert cli.main(["evaluate", "--pred-dir", str(pred), "--gt-dir", str(gt), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # road: tp 48, fp 48 (sky predicted as road) -> 50 %, sky: 0 % -> mIoU 25 %
    assert res["mIoU"] == pytest.approx(25.0)
    assert res["per_class"]["road"] == pytest.approx(50.0)
    assert res["per_class"]["car"] is None
    assert "mIoU" in capsys.readouterr().out


def test_cli_evaluate_missing_prediction_names_file(tmp_path, capsys):
    pred, gt = _write(tmp_path)
    Image.fromarray(np.full((8, 12), 7, np.uint8)).save(
        gt / "aachen" / "aachen_000002_000019_gtFine_labelIds.png"
    )
    assert cli.main(["evaluate", "--pred-dir", str(pred), "--gt-dir", str(gt)]) != 0
    assert "aachen_000002_000019_gtFine_labelIds.png" in capsys.readouterr().err


def test_cli_evaluate_size_mismatch_names_file(tmp_path, capsys):
    pred, gt = _write(tmp_path, pred_shape=(8, 10))
    assert cli.main(["evaluate", "--pred-dir", str(pred), "--gt-dir", str(gt)]) != 0
    err = capsys.readouterr().err
    assert "size mismatch" in err and "aachen_000001_000019_leftImg8bit.png" in err


def test_cli_evaluate_rgb_prediction_and_empty_gt(tmp_path):
    pred, gt = _write(tmp_path)
    p = next(pred.rglob("*.png"))
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(p)
    with pytest.raises(ValueError, match="channels"):
        metrics.score_prediction_folder(pred, gt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="gtFine_labelIds"):
        metrics.score_prediction_folder(pred, tmp_path / "empty")


# ------------------------------------------------------------------------- domain distance
def _smooth_images(n, seed, tint, noise=0.0, blur=False):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 8, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(32, 64), mode="bilinear", align_corners=False)
    x = x * 0.6 + torch.tensor(tint).view(1, 3, 1, 1)
    if blur:
        x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def test_domain_distance_separates_distributions():
    a1 = _smooth_images(48, 0, (0.2, 0.0, -0.2))
    a2 = _smooth_images(48, 1, (0.2, 0.0, -0.2))
    b = _smooth_images(48, 2, (-0.1, 0.0, 0.15), noise=0.15)
    same = metrics.domain_distance(a1, a2, n_subsets=20)
    diff = metrics.domain_distance(a1, b, n_subsets=20)
    assert diff["kid"] > 0.1
    assert abs(same["kid"]) < 0.1 * diff["kid"]
    assert diff["kid"] > 5 * diff["kid_std"]
    assert same["feature"] == metrics.FixedFeatureNet.NAME
    # against one reference, a set half-way there scores between the two
    half = _smooth_images(48, 3, (0.05, 0.0, -0.025), noise=0.075)
    mid = metrics.domain_distance(half, a1, n_subsets=20)["kid"]
    far = metrics.domain_distance(b, a1, n_subsets=20)["kid"]
    assert same["kid"] < mid < far
    # deterministic: a fixed network, seeded subsets
    assert metrics.domain_distance(a1, b, n_subsets=20)["kid"] == diff["kid"]


def test_kid_estimator_unbiased_on_identical_features():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 8))
    g = rng.normal(size=(200, 8))
    kid, _ = metrics.kid_from_features(f, g, n_subsets=30, subset_size=100)
    assert abs(kid) < 0.05
    kid2, _ = metrics.kid_from_features(f, g + 1.0, n_subsets=30, subset_size=100)
    assert kid2 > 10 * abs(kid)
    with pytest.raises(ValueError):
        metrics.kid_from_features(f[:1], g[:1])


def test_inception_metric_without_weights_says_so(monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    a = _smooth_images(8, 0, (0, 0, 0))
    with pytest.warns(UserWarning, match="Inception weights"):
        res = metrics.fid_kid_inception(a, a.flip(-1))
    assert res["metric"] == metrics.FixedFeatureNet.NAME and math.isnan(res["fid"])
    assert "instead" in res["message"]
    with pytest.raises(FileNotFoundError, match="missing"):
        metrics.fid_kid_inception(a, a, fallback=False)
