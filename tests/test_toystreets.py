import json
import os

import numpy as np
import pytest
from PIL import Image

from dasslab import datasets as D
from dasslab import labels as L
from dasslab import toystreets as T

SIZE = (32, 64)


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_render_is_deterministic_and_labels_do_not_depend_on_the_look():
    for dom, cond in [("source", "day"), ("target", "day"), ("target", "night"), ("target", "snow")]:
        a, la = T.render(5, SIZE, dom, cond)
        b, lb = T.render(5, SIZE, dom, cond)
        assert a.dtype == np.uint8 and a.shape == (*SIZE, 3) and la.shape == SIZE
        assert a.tobytes() == b.tobytes() and la.tobytes() == lb.tobytes()
    labels = [T.render(5, SIZE, d, c)[1] for d, c in [("source", "day"), ("target", "day"), ("target", "fog")]]
    assert all((lab == labels[0]).all() for lab in labels)
    assert not (T.render(6, SIZE)[1] == labels[0]).all()
    assert not (T.render(5, SIZE, seed=1)[1] == labels[0]).all()


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        T.render(0, SIZE, "painting")
    with pytest.raises(ValueError, match="condition"):
        T.render(0, SIZE, "target", "hail")
    with pytest.raises(ValueError, match="target"):
        T.render(0, SIZE, "source", "night")
    with pytest.raises(ValueError, match="HxW"):
        T.render(0, "32by64")
    with pytest.raises(ValueError, match="too small"):
        T.render(0, (8, 8))


@pytest.mark.parametrize("size", [(32, 64), (48, 80), (128, 256), (256, 512)])
def test_any_size_and_geometry_scales(size):
    _, small = T.render(11, (32, 64))
    img, lab = T.render(11, size, "target")
    assert img.shape == (*size, 3) and lab.shape == size
    # the same layout at another size: class fractions agree (geometry is image-relative)
    f_small = np.bincount(small.ravel(), minlength=256)[:19] / small.size
    f_big = np.bincount(lab.ravel(), minlength=256)[:19] / lab.size
    assert np.abs(f_small - f_big).sum() < 0.15


def test_at_least_ten_classes_in_the_layout_distribution():
    seen = set()
    for s in range(40):
        seen |= set(np.unique(T.render(s, (64, 128))[1]).tolist())
    assert len(seen - {255}) >= 10
    assert seen <= set(T.CLASSES_PRESENT)


def _class_freq(labels):
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=256)[:19]
    return counts / counts.sum()


def test_source_and_target_differ_in_appearance_but_share_the_layout_distribution():
    src = [T.render(s, SIZE, "source") for s in range(60)]
    tgt = [T.render(10_000 + s, SIZE, "target") for s in range(60)]
    # layout distribution: the label never depends on the look (same seed, same label; tested above),
    # so independent layouts from both domains have close class frequencies (sampling noise only)
    assert np.abs(_class_freq([lab for _, lab in src]) - _class_freq([lab for _, lab in tgt])).sum() < 0.15
    # appearance: on the same layout the pictures differ a lot ...
    a = np.stack([T.render(s, SIZE, "source")[0] for s in range(10)]).astype(float)
    b = np.stack([T.render(s, SIZE, "target")[0] for s in range(10)]).astype(float)
    assert np.abs(a - b).mean() > 25
    # ... the source look is flat (most neighbouring pixels equal), the camera look is noisy/textured
    def flat_fraction(imgs):
        return np.mean([(np.abs(np.diff(x.astype(int), axis=1)).sum(-1) == 0).mean() for x in imgs])
    assert flat_fraction(a) > 0.6 and flat_fraction(b) < 0.1
    # and the source colours are not the label palette
    img, lab = src[0]
    assert (np.abs(img.astype(int) - L.colourise(lab).astype(int)).sum(-1) > 30).mean() > 0.8


def test_adverse_conditions_change_the_look_as_named():
    seeds = range(8)
    day = np.stack([T.render(s, SIZE, "target", "day")[0] for s in seeds]).astype(float)
    for cond in T.ADVERSE:
        imgs = np.stack([T.render(s, SIZE, "target", cond)[0] for s in seeds]).astype(float)
        assert np.abs(imgs - day).mean() > 10, cond
    night = np.stack([T.render(s, SIZE, "target", "night")[0] for s in seeds]).astype(float)
    assert night.mean() < 0.5 * day.mean()
    fog = np.stack([T.render(s, SIZE, "target", "fog")[0] for s in seeds]).astype(float)
    assert fog.std(axis=(1, 2)).mean() < day.std(axis=(1, 2)).mean()
    ground = [np.isin(T.render(s, SIZE)[1], [T.ROAD, T.SIDEWALK, T.TERRAIN]) for s in seeds]
    snow = np.stack([T.render(s, SIZE, "target", "snow")[0] for s in seeds]).astype(float)
    assert np.mean([snow[i][g].mean() - day[i][g].mean() for i, g in enumerate(ground)]) > 20


def test_split_seeds_are_disjoint_and_below_the_corpus_offset():
    seeds = T.split_seeds(400, 100)
    allseeds = [s for r in seeds.values() for s in r]
    assert len(allseeds) == len(set(allseeds))
    assert max(allseeds) < T.CORPUS_SEED_OFFSET == 10**6
    assert len(seeds["fog_train"]) == 100 and len(seeds["fog_val"]) == 100 and len(seeds["target_train"]) == 400


def test_generate_writes_the_real_layouts(toy_root):
    settings = json.loads((toy_root / ".complete").read_text())
    assert settings["size"] == [32, 64] and settings["n_train"] == 8
    gta = toy_root / "gta5"
    assert (gta / "train.txt").read_text().split() == [f"{i:05d}" for i in range(1, 9)]
    assert len((gta / "val.txt").read_text().split()) == 4
    assert len(list((gta / "images").glob("*.png"))) == len(list((gta / "labels").glob("*.png"))) == 12
    cs = toy_root / "cityscapes"
    assert len(list((cs / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))) == 8
    for kind in ("labelIds", "labelTrainIds", "color"):
        assert len(list((cs / "gtFine" / "val").glob(f"*/*_gtFine_{kind}.png"))) == 4
    for cond in ("night", "fog", "rain", "snow"):
        assert len(list((toy_root / "acdc" / "rgb_anon" / cond / "train").glob("*/*_rgb_anon.png"))) == 2
        for kind in ("labelTrainIds", "labelIds", "labelColor"):
            assert len(list((toy_root / "acdc" / "gt" / cond / "val").glob(f"*/*_gt_{kind}.png"))) == 4
    # the three label encodings of a Cityscapes-layout item agree
    f = next((cs / "gtFine" / "train").glob("*/*_gtFine_labelTrainIds.png"))
    train = np.asarray(Image.open(f))
    ids = np.asarray(Image.open(str(f).replace("labelTrainIds", "labelIds")))
    color = np.asarray(Image.open(str(f).replace("labelTrainIds", "color")))
    assert (L.label_ids_to_train(ids) == train).all() and (L.colourise(train) == color).all()
    # GTA5 labels hold label ids (like real GTA5) and match a fresh render of the first layout seed
    ids = np.asarray(Image.open(gta / "labels" / "00001.png"))
    img, lab = T.render(T.split_seeds(8, 4)["source_train"][0], (32, 64), "source")
    assert (L.label_ids_to_train(ids) == lab).all()
    assert (np.asarray(Image.open(gta / "images" / "00001.png")) == img).all()


def test_generated_splits_read_back_with_the_real_readers(toy_cfg):
    sets = D.benchmark_sets(toy_cfg)
    names = {k: set(v.names) for k, v in sets.items()}
    assert not names["source_train"] & names["source_val"]
    for k, ds in sets.items():
        lab = ds[0]["label"]
        assert lab.shape == (32, 64) and set(lab.unique().tolist()) <= set(T.CLASSES_PRESENT), k


def test_generation_is_deterministic_and_resumes_only_missing_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out = T.generate(a, SIZE, n_train=4, n_val=2, seed=3, conditions=["fog"], progress=False)
    assert out["rendered"] == 4 + 2 + 4 + 2 + 1 + 2
    T.generate(b, SIZE, n_train=4, n_val=2, seed=3, conditions=["fog"], progress=False)
    fa, fb = files_under(a), files_under(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    # resume: delete some files, regenerate: only those come back, byte-identical, others untouched
    victims = [a / "gta5" / "images" / "00002.png", next((a / "cityscapes" / "gtFine").rglob("*_color.png"))]
    saved = {p: p.read_bytes() for p in victims}
    keep = a / "gta5" / "labels" / "00001.png"
    os.utime(keep, ns=(1, 1))
    for p in victims:
        p.unlink()
    out = T.generate(a, SIZE, n_train=4, n_val=2, seed=3, conditions=["fog"], progress=False)
    assert out["rendered"] == 2
    assert all(p.read_bytes() == saved[p] for p in victims)
    assert keep.stat().st_mtime_ns == 1
    assert T.generate(a, SIZE, n_train=4, n_val=2, seed=3, conditions=["fog"], progress=False)["rendered"] == 0


def test_other_settings_in_the_same_root_is_an_error(tmp_path):
    T.generate(tmp_path / "r", SIZE, n_train=2, n_val=1, conditions=[], progress=False)
    with pytest.raises(ValueError, match="another root"):
        T.generate(tmp_path / "r", SIZE, n_train=3, n_val=1, conditions=[], progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a ToyStreets folder"):
        T.generate(tmp_path / "other", SIZE, n_train=2, n_val=1, progress=False)
    with pytest.raises(ValueError, match="hail"):
        T.generate(tmp_path / "c", SIZE, n_train=2, n_val=1, conditions=["hail"], progress=False)
    with pytest.raises(FileNotFoundError, match="00_data_prep"):
        T.check_generated(tmp_path / "c")
    with pytest.raises(ValueError, match="size"):
        T.check_generated(tmp_path / "r", {"size": [64, 128]})
    marker = tmp_path / "r" / ".complete"
    marker.write_text(marker.read_text().replace(f'"version": {T.GENERATOR_VERSION}', '"version": 0'))
    with pytest.raises(ValueError, match="generator version 0"):
        T.check_generated(tmp_path / "r")


def test_cli_generates(tmp_path, capsys):
    import argparse

    from dasslab import cli

    assert "dasslab.toystreets" in cli.COMMAND_MODULES
    parser = argparse.ArgumentParser()
    T.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "toystreets", "--root", str(tmp_path / "cli"), "--size", "32x48",
                              "--n-train", "2", "--n-val", "1", "--conditions", "night"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["night_val"] == 1
    assert T.check_generated(tmp_path / "cli")["size"] == [32, 48]
    args = parser.parse_args(["data", "toystreets", "--root", str(tmp_path / "cli"), "--size", "32x64",
                              "--n-train", "2", "--n-val", "1", "--conditions", "night"])
    with pytest.raises(ValueError, match="another root"):
        args.func(args)
