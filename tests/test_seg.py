import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from dasslab import runs, seg
from dasslab.seg import downstream as seg_downstream

H, W = 16, 32


class Streets(Dataset):
    """A tiny labelled set in the SegFolder item format: road below a horizon, a car box, sky above.

    ``style`` changes the colours (a domain gap); ``paired`` adds an ``image_t`` key."""

    def __init__(self, n=12, seed=0, style=0, paired=False, root=None):
        g = torch.Generator().manual_seed(seed)
        self.items, self.root, self.names = [], root, [f"s{seed}_{i:03d}" for i in range(n)]
        colours = {
            0: {0: (-0.5, -0.5, -0.5), 10: (0.2, 0.5, 0.9), 13: (0.9, -0.6, -0.6)},
            1: {0: (0.3, 0.1, -0.2), 10: (0.8, 0.8, 0.8), 13: (-0.8, -0.8, 0.6)},
        }[style]
        for i in range(n):
            lab = torch.full((H, W), 10, dtype=torch.long)
            r = int(torch.randint(5, 11, (1,), generator=g))
            lab[r:] = 0
            c = int(torch.randint(0, W - 8, (1,), generator=g))
            lab[r - 3 : r + 1, c : c + 8] = 13
            lab[0, :3] = 255
            img = torch.zeros(3, H, W)
            for k, col in colours.items():
                img += (lab == k).float()[None] * torch.tensor(col).view(3, 1, 1)
            img = (img + 0.05 * torch.randn(3, H, W, generator=g)).clamp(-1, 1)
            item = {"image": img, "label": lab, "name": self.names[i]}
            if paired:
                item["image_t"] = img * 0.5
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _tiny(seed=0):
    torch.manual_seed(seed)
    return seg.build_segmenter("unet-small", width=4, depth=2)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


TC = {"iters": 8, "batch_size": 4, "lr": 3e-2, "seed": 0}


# ------------------------------------------------------------------------- models
def test_unet_small_shapes_and_size():
    m = seg.build_segmenter("unet-small")
    n = sum(p.numel() for p in m.parameters())
    assert 1e5 < n < 1.5e6
    x = torch.randn(2, 3, 30, 60)  # not a multiple of 8: padded inside
    assert m(x).shape == (2, 19, 30, 60)
    assert m.forward_features(x).dim() == 4
    with pytest.raises(ValueError, match="unknown segmenter"):
        seg.build_segmenter("unet-huge")


@pytest.mark.parametrize("name", ["segformer-b0"])
def test_timm_and_transformer_models_fast(name):
    m = seg.build_segmenter(name, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert m(x).shape == (1, 5, 32, 64)
        assert m.forward_features(x).dim() == 4


@pytest.mark.parametrize("name,stride", [("deeplabv2-r101", 8), ("deeplabv3plus-r50", 16)])
def test_deeplab_models(name, stride):
    m = seg.build_segmenter(name, num_classes=19).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert m(x).shape == (1, 19, 64, 64)
        f = m.forward_features(x)
    assert f.shape[-1] == 64 // stride and f.shape[1] == 2048


def test_pretrained_path_missing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        seg.build_segmenter("deeplabv2-r101", pretrained_path=tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------- training
def test_training_learns_and_is_seeded():
    ds = Streets(16)
    m1, h1 = seg.train_segmenter(_tiny(), ds, seg.TrainConfig(**{**TC, "iters": 40}))
    assert isinstance(h1, pd.DataFrame) and list(h1["iter"]) == list(range(1, 41))
    assert h1["loss"].tail(5).mean() < h1["loss"].head(5).mean()
    assert seg.evaluate(m1, Streets(6, seed=5))["mIoU"] > 40
    w1 = _weights(m1)
    m2, _ = seg.train_segmenter(_tiny(), ds, seg.TrainConfig(**{**TC, "iters": 40}))
    assert _same(w1, _weights(m2))
    m3, _ = seg.train_segmenter(_tiny(), ds, seg.TrainConfig(**{**TC, "iters": 40, "seed": 1}))
    assert not _same(w1, _weights(m3))


def test_resume_equals_uninterrupted(tmp_path):
    ds = Streets(10)
    tc = seg.TrainConfig(**{**TC, "iters": 9, "ckpt_every": 3, "sampling": "rare-class", "crop": (12, 24)})
    full, hist_full = seg.train_segmenter(_tiny(), ds, tc, out_dir=tmp_path / "a")
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated interruption")
        return seg.cross_entropy_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        seg.train_segmenter(_tiny(), ds, tc, out_dir=tmp_path / "b", loss_fn=crashing)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step_0000003"]
    resumed, hist = seg.train_segmenter(_tiny(seed=9), ds, tc, out_dir=tmp_path / "b")
    assert _same(_weights(full), _weights(resumed))
    assert list(hist["iter"]) == list(range(1, 10))
    assert np.allclose(hist["loss"], hist_full["loss"])
    # a finished run resumes to its final weights without training
    again, _ = seg.train_segmenter(_tiny(seed=3), ds, tc, out_dir=tmp_path / "b")
    assert _same(_weights(full), _weights(again))
    with pytest.raises(ValueError, match="another training config"):
        seg.train_segmenter(
            _tiny(), ds, seg.TrainConfig(**{**TC, "iters": 9, "lr": 1e-3}), out_dir=tmp_path / "b"
        )


def test_loss_fn_hook_gets_extra_keys_augmented_alike():
    ds = Streets(8, paired=True)
    seen = []

    def paired_loss(model, batch):
        assert torch.allclose(batch["image_t"], batch["image"] * 0.5)  # same crop and flip
        assert batch["image"].shape[-2:] == (8, 16)
        assert isinstance(batch["name"], list)
        ce, _ = seg.cross_entropy_loss(model, batch)
        feat_sim = torch.nn.functional.cosine_similarity(
            model.forward_features(batch["image"]).mean((2, 3)),
            model.forward_features(batch["image_t"]).mean((2, 3)),
        ).mean()
        seen.append(1)
        return ce - 0.1 * feat_sim, {"ce": ce.item(), "sim": feat_sim.item()}

    _, hist = seg.train_segmenter(
        _tiny(), ds, seg.TrainConfig(**{**TC, "iters": 3, "crop": (8, 16)}), loss_fn=paired_loss
    )
    assert len(seen) == 3 and {"ce", "sim"} <= set(hist.columns)


def test_rare_class_and_balanced_weights():
    counts = np.array([1000, 10, 0])
    present = np.array([[1, 0, 0]] * 9 + [[1, 1, 0]], bool)
    w = seg.rare_class_weights(counts, present, 0.01).numpy()
    assert w[-1] > 0.9  # the only image holding the rare class dominates
    cw = seg.balanced_class_weights(counts).numpy()
    assert cw[1] > cw[0]
    with pytest.raises(ValueError, match="sampling"):
        seg.TrainConfig(sampling="rare")


def test_sliding_window_and_save_load(tmp_path):
    m, _ = seg.train_segmenter(_tiny(), Streets(8), seg.TrainConfig(**{**TC, "iters": 4}))
    x = Streets(2, seed=3)[0]["image"][None]
    whole = seg.predict_logits(m, x)
    same = seg.predict_logits(m, x, mode="slide", crop=(H, W))
    assert torch.allclose(whole, same, atol=1e-6)
    slide = seg.predict_logits(m, x, mode="slide", crop=(8, 16), stride=(4, 8))
    assert slide.shape == whole.shape and torch.isfinite(slide).all()
    seg.save_segmenter(m, tmp_path / "s", meta={"note": "x"})
    m2 = seg.load_segmenter(tmp_path / "s")
    assert m2.seg_meta == {"note": "x"}
    assert torch.allclose(seg.predict_logits(m2, x), whole, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        seg.load_segmenter(tmp_path / "empty")


def test_evaluate_matches_confusion_and_empty_error():
    m, _ = seg.train_segmenter(_tiny(), Streets(8), seg.TrainConfig(**{**TC, "iters": 4}))
    ds = Streets(4, seed=7)
    res = seg.evaluate(m, ds, batch_size=3)
    pred = seg.predict(m, ds)
    gt = torch.stack([it["label"] for it in ds.items])
    from dasslab.metrics import ConfusionMatrix

    assert res["mIoU"] == pytest.approx(ConfusionMatrix(19).update(pred, gt).miou() * 100)
    assert res["confusion"].shape == (19, 19) and res["n_images"] == 4
    with pytest.raises(ValueError, match="empty"):
        seg.evaluate(m, Streets(0))


# ------------------------------------------------------------------------- caching and baselines
def _cfg(tmp_path, **seg_over):
    table = {
        "model": "unet-small",
        "model_kwargs": {"width": 4, "depth": 2},
        "iters": 6,
        "batch_size": 4,
        "lr": 3e-2,
        "weight_decay": 1e-4,
        "seeds": [0, 1],
    }
    table.update(seg_over)
    return runs.Config.wrap({"profile": "test", "run_dir": tmp_path, "device": "cpu", "seg": table})


def _count_trainings(monkeypatch):
    calls = []
    real = seg_downstream.train_segmenter

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(seg_downstream, "train_segmenter", counting)
    return calls


def test_get_or_train_caches_and_retrains_on_change(tmp_path, monkeypatch):
    calls = _count_trainings(monkeypatch)
    rd = runs.RunDir(tmp_path)
    src = Streets(8, root=tmp_path / "src")
    m1 = seg.get_or_train(rd, "src", [src], _cfg(tmp_path))
    m2 = seg.get_or_train(rd, "src", [src], _cfg(tmp_path))
    assert len(calls) == 1 and _same(_weights(m1), _weights(m2))
    assert (rd.segmenter_dir("src") / "model.safetensors").is_file()
    assert not list(rd.segmenter_dir("src").glob("train-*"))  # checkpoints cleaned after success
    view = seg.get_or_train(rd, "src_view", [src], _cfg(tmp_path))  # same training, another name
    assert len(calls) == 1 and _same(w_src := _weights(m1), _weights(view))
    seg.get_or_train(rd, "src", [src], _cfg(tmp_path, iters=7))
    assert len(calls) == 2
    seg.get_or_train(rd, "src", [Streets(9, root=tmp_path / "src")], _cfg(tmp_path, iters=7))
    assert len(calls) == 3  # different data -> retrain
    assert _same(w_src, _weights(seg.load_segmenter(rd.segmenter_dir("src_view"))))

    class HalfCE:  # a callable loss object: its class names it in the fingerprint
        def __call__(self, model, batch):
            loss, logs = seg.cross_entropy_loss(model, batch)
            return 0.5 * loss, logs

    seg.get_or_train(rd, "src_view", [src], _cfg(tmp_path), loss_fn=HalfCE())
    assert len(calls) == 4
    seg.get_or_train(rd, "src_view", [src], _cfg(tmp_path), loss_fn=HalfCE(), fingerprint_extra={"w": 0.5})
    assert len(calls) == 5
    with pytest.raises(KeyError, match="unknown keys"):
        seg.get_or_train(rd, "src", [src], _cfg(tmp_path, itres=5))


def test_train_and_evaluate_table_cache_and_summary(tmp_path, monkeypatch):
    rd = runs.RunDir(tmp_path)
    cfg = _cfg(tmp_path)
    sets = {
        "source_train": Streets(8, seed=1, style=1, root=tmp_path / "s"),
        "target_train": Streets(8, seed=2, root=tmp_path / "t"),
        "target_val": Streets(4, seed=3, root=tmp_path / "v"),
    }
    table = seg.baselines(rd, cfg, sets)
    assert list(table.columns) == ["method", "eval_set", "seed", "class", "IoU"]
    assert set(table["method"]) == {"source_only", "oracle"} and set(table["seed"]) == {0, 1}
    assert (table["class"] == "mIoU").sum() == 4
    calls = _count_trainings(monkeypatch)
    again = seg.baselines(rd, cfg, sets)
    assert calls == [] and again.equals(table)
    assert len(seg.cached_evaluations(rd)) == 4
    assert seg.confusion_of(rd, "oracle").shape == (19, 19)
    gathered = seg.results_table(rd)  # what a later notebook reads back, without training
    pd.testing.assert_frame_equal(
        gathered.sort_values(list(gathered.columns[:4])).reset_index(drop=True),
        table.sort_values(list(table.columns[:4])).reset_index(drop=True),
    )
    # new settings for a method replace its old records instead of piling up
    seg.train_and_evaluate(
        "oracle", [sets["target_train"]], sets["target_val"], _cfg(tmp_path, iters=5), seeds=[0], rd=rd
    )
    assert len(seg.cached_evaluations(rd)) == 4
    summ = seg.summarize(table)
    row = summ.set_index("method")
    assert row.loc["source_only", "gain"] == 0
    assert row.loc["oracle", "gap_closed"] == pytest.approx(1.0)
    assert row.loc["oracle", "n_seeds"] == 2


def test_summarize_math():
    t = pd.DataFrame(
        [
            ("source_only", 0, "mIoU", 30.0),
            ("source_only", 1, "mIoU", 32.0),
            ("oracle", 0, "mIoU", 70.0),
            ("oracle", 1, "mIoU", 70.0),
            ("m", 0, "mIoU", 41.0),
            ("m", 1, "mIoU", 41.0),
            ("m", 0, "road", 99.0),
        ],
        columns=["method", "seed", "class", "IoU"],
    )
    s = seg.summarize(t).set_index("method")
    assert s.loc["m", "mIoU"] == 41.0 and s.loc["m", "gain"] == 10.0
    assert s.loc["m", "gap_closed"] == pytest.approx(10 / 39)
    assert s.loc["source_only", "std"] == pytest.approx(np.std([30, 32], ddof=1))


def test_label_consistency_uses_reference(tmp_path):
    from dasslab import metrics

    rd = runs.RunDir(tmp_path)
    cfg = _cfg(tmp_path, iters=30)
    sets = {"target_train": Streets(12, seed=2, root=tmp_path / "t")}
    ref = seg.reference_segmenter(rd, cfg, sets)
    same_style = metrics.label_consistency(ref, Streets(6, seed=4))
    other_style = metrics.label_consistency(ref, Streets(6, seed=4, style=1))
    assert same_style > other_style


def test_segfolder_sets_cache_by_content(tmp_path, monkeypatch):
    """With the real reader: a translated folder re-written with other settings retrains."""
    datasets = pytest.importorskip("dasslab.datasets")
    src = Streets(8, seed=1)
    imgs = torch.stack([it["image"] for it in src.items])
    labs = torch.stack([it["label"] for it in src.items])
    out = tmp_path / "translated" / "m"
    datasets.write_translated(out, src.names, imgs, labs)
    runs.atomic_save_json(out / "translation.json", {"method": "m", "strength": 0.3})
    ds = datasets.SegFolder(out, preset="gta5")
    counts, present = seg.label_statistics(ds, 19)  # labels only, through SegFolder.read_label
    assert counts[13] > 0 and present.shape == (8, 19)
    assert torch.equal(ds[0]["label"], labs[0])
    calls = _count_trainings(monkeypatch)
    rd = runs.RunDir(tmp_path / "run")
    cfg = _cfg(tmp_path, sampling="rare-class")
    seg.get_or_train(rd, "m", [ds], cfg)
    seg.get_or_train(rd, "m", [datasets.SegFolder(out, preset="gta5")], cfg)
    assert len(calls) == 1
    runs.atomic_save_json(out / "translation.json", {"method": "m", "strength": 0.6})
    seg.get_or_train(rd, "m", [datasets.SegFolder(out, preset="gta5")], cfg)
    assert len(calls) == 2


def test_color_jitter_is_seeded_and_leaves_labels():
    b = {
        "image": torch.rand(4, 3, 8, 8) * 2 - 1,
        "image_t": torch.rand(4, 3, 8, 8) * 2 - 1,
        "label": torch.randint(0, 19, (4, 8, 8)),
    }
    tc = seg.TrainConfig(color_jitter=0.5, flip=False)
    out = seg.augment(b, tc, step=3)
    assert torch.equal(out["label"], b["label"])
    assert not torch.allclose(out["image"], b["image"]) and out["image"].abs().max() <= 1
    assert torch.equal(out["image"], seg.augment(b, tc, step=3)["image"])
    assert not torch.equal(out["image"], seg.augment(b, tc, step=4)["image"])


def test_local_pretrained_backbone_weights_are_loaded(tmp_path):
    """ImageNet-style weights from a local file (never a download) end up in the backbone."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    classifier = timm.create_model("resnet50", pretrained=False)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    m = seg.build_segmenter("deeplabv3plus-r50", pretrained_path=path)
    assert torch.equal(m.backbone.state_dict()["conv1.weight"], classifier.state_dict()["conv1.weight"])
    assert "pretrained_path" not in m.seg_config["kwargs"]
    bad = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="matches only"):
        seg.build_segmenter("deeplabv3plus-r50", pretrained_path=bad)
