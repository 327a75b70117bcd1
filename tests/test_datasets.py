"""Fixtures written in each real on-disk layout with the real raw encodings, read back."""

import struct
import zlib

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dasslab import datasets as D
from dasslab import labels as L
from dasslab.pngio import encode_png16, read_png

H, W = 6, 10
RNG = np.random.default_rng(0)


def rand_image(h=H, w=W):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def rand_train(h=H, w=W):
    lab = RNG.integers(0, 19, (h, w)).astype(np.uint8)
    lab[0, 0] = 255
    return lab


def save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # GTA5 ships palette PNGs whose indices are the label ids
        im = Image.new("P", (arr.shape[1], arr.shape[0]))
        im.putdata(arr.ravel().tolist())
        im.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())
    else:
        im = Image.fromarray(arr)
    im.save(path)


def make_gta5(root, n=4, split_mat=True):
    truth = {}
    for i in range(1, n + 1):
        stem = f"{i:05d}"
        lab = rand_train()
        save(root / "images" / f"{stem}.png", rand_image())
        save(root / "labels" / f"{stem}.png", L.train_to_label_ids(lab), mode="P")
        truth[stem] = lab
    if split_mat:
        scipy.io.savemat(root / "split.mat", {"trainIds": np.array([[1], [2], [3]]), "valIds": np.array([[4]]),
                                              "testIds": np.zeros((0, 1))})
    return truth


def test_gta5_label_ids_and_split_mat(tmp_path):
    truth = make_gta5(tmp_path)
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    tr = D.SegFolder(tmp_path, "gta5", split="train")
    va = D.SegFolder(tmp_path, "gta5", split="val")
    assert tr.names == ["00001", "00002", "00003"] and va.names == ["00004"]
    for ds in (tr, va):
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
            assert item["image"].min() >= -1 and item["image"].max() <= 1
            assert item["label"].dtype == torch.int64
            assert (item["label"].numpy() == truth[item["name"]]).all()
    assert len(D.SegFolder(tmp_path, "gta5")) == 4  # split=None: every image


def test_gta5_split_txt_wins_and_image_values(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "val.txt").write_text("00002\n00003.png\n")
    ds = D.SegFolder(tmp_path, "gta5", split="val")
    assert ds.names == ["00002", "00003"]
    raw = np.array(Image.open(tmp_path / "images" / "00002.png"))
    x = ds[0]["image"]
    assert torch.allclose(x, torch.from_numpy(raw).permute(2, 0, 1).float() / 127.5 - 1)


def test_synthia_16bit_labels(tmp_path):
    ids = RNG.integers(0, 23, (H, W)).astype(np.uint16)
    raw = np.stack([ids, RNG.integers(0, 3000, (H, W)), np.zeros((H, W))], -1).astype(np.uint16)
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    (tmp_path / "GT" / "LABELS" / "0000001.png").write_bytes(encode_png16(raw))
    save(tmp_path / "RGB" / "0000001.png", rand_image())
    ds = D.SegFolder(tmp_path, "synthia")
    want = np.vectorize(lambda v: L.SYNTHIA_ID_TO_TRAIN[int(v)])(ids)
    assert (ds[0]["label"].numpy() == want).all()
    # Pillow alone keeps only the high byte of 16-bit colour PNGs (ids would all read as 0)
    assert np.asarray(Image.open(tmp_path / "GT" / "LABELS" / "0000001.png"))[..., 0].max() == 0 < ids.max()


def make_cityscapes(root, split="train", city="aachen", n=2, kinds=("ids",)):
    truth = {}
    for i in range(n):
        stem = f"{city}_{i:06d}_000019"
        lab = rand_train()
        save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rand_image())
        gt = root / "gtFine" / split / city
        if "ids" in kinds:
            save(gt / f"{stem}_gtFine_labelIds.png", L.train_to_label_ids(lab))
        if "train" in kinds:
            save(gt / f"{stem}_gtFine_labelTrainIds.png", lab)
        save(gt / f"{stem}_gtFine_color.png", L.colourise(lab))
        truth[stem] = lab
    return truth


def test_cityscapes_label_ids_are_converted(tmp_path):
    truth = make_cityscapes(tmp_path, "train", "aachen")
    truth_val = make_cityscapes(tmp_path, "val", "lindau", n=1)
    ds = D.SegFolder(tmp_path, "cityscapes", split="train")
    assert ds.names == sorted(truth)
    for i in range(len(ds)):
        assert (ds[i]["label"].numpy() == truth[ds[i]["name"]]).all()
    assert len(D.SegFolder(tmp_path, "cityscapes", split=None)) == len(truth) + len(truth_val)


def test_cityscapes_prefers_label_train_ids(tmp_path):
    make_cityscapes(tmp_path, kinds=("ids",))
    ds = D.SegFolder(tmp_path, "cityscapes", split="train")
    stem = ds.names[0]
    other = np.full((H, W), 5, np.uint8)
    save(tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelTrainIds.png", other)
    ds = D.SegFolder(tmp_path, "cityscapes", split="train")
    assert (ds[0]["label"] == 5).all()


def make_acdc(root, cond, split, n=2):
    truth = {}
    seq = f"GOPR{hash(cond) % 1000:04d}"
    for i in range(n):
        stem = f"{seq}_{cond}_frame_{i:06d}"
        lab = rand_train()
        save(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", rand_image())
        save(root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png", lab)
        truth[stem] = lab
    return truth


def test_acdc_conditions(tmp_path):
    t_fog = make_acdc(tmp_path, "fog", "val")
    t_night = make_acdc(tmp_path, "night", "val", n=3)
    make_acdc(tmp_path, "night", "train", n=1)
    fog = D.SegFolder(tmp_path, "acdc", split="val", condition="fog")
    assert fog.names == sorted(t_fog)
    assert all((fog[i]["label"].numpy() == t_fog[fog[i]["name"]]).all() for i in range(len(fog)))
    assert len(D.SegFolder(tmp_path, "acdc", split="val")) == 5
    assert len(D.SegFolder(tmp_path, "acdc", split="val", condition="night")) == len(t_night)
    with pytest.raises(ValueError, match="condition"):
        D.SegFolder(tmp_path, "acdc", split="val", condition="hail")


# ---------------------------------------------------------------- errors


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        D.SegFolder(tmp_path / "nope", "gta5")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="labels"):
        D.SegFolder(tmp_path, "gta5")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        D.SegFolder(tmp_path, "cityscapes", split="train")
    with pytest.raises(ValueError, match="preset"):
        D.SegFolder(tmp_path, "kitti")


def test_image_without_label(tmp_path):
    make_gta5(tmp_path, split_mat=False)
    (tmp_path / "labels" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="00003.png"):
        D.SegFolder(tmp_path, "gta5")
    make_cityscapes(tmp_path / "cs")
    next((tmp_path / "cs" / "gtFine").rglob("*_labelIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match="gtFine_labelTrainIds.png or .*_gtFine_labelIds.png"):
        D.SegFolder(tmp_path / "cs", "cityscapes", split="train")
    # without labels the same folder opens fine
    assert len(D.SegFolder(tmp_path / "cs", "cityscapes", split="train", with_labels=False)) == 2
    assert "label" not in D.SegFolder(tmp_path / "cs", "cityscapes", split="train", with_labels=False)[0]


def test_label_of_wrong_size(tmp_path):
    make_gta5(tmp_path, split_mat=False)
    save(tmp_path / "labels" / "00002.png", np.full((H + 1, W), 7, np.uint8))
    ds = D.SegFolder(tmp_path, "gta5")
    ds[0]
    with pytest.raises(ValueError, match=r"labels/00002.png"):
        ds[1]


def test_unreadable_and_bad_value_files(tmp_path):
    make_gta5(tmp_path, split_mat=False)
    (tmp_path / "images" / "00001.png").write_bytes(b"not a png")
    save(tmp_path / "labels" / "00002.png", np.full((H, W), 40, np.uint8))
    save(tmp_path / "labels" / "00003.png", rand_image())
    ds = D.SegFolder(tmp_path, "gta5")
    with pytest.raises(OSError, match="images/00001.png"):
        ds[0]
    with pytest.raises(ValueError, match=r"40 in .*labels/00002.png"):
        ds[1]
    with pytest.raises(ValueError, match=r"labels/00003.png .*one channel"):
        ds[2]


def test_empty_dataset_and_missing_split(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        D.SegFolder(tmp_path, "gta5")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        D.SegFolder(tmp_path, "gta5", split="val")
    (tmp_path / "val.txt").write_text("00009\n")
    with pytest.raises(FileNotFoundError, match="00009.png"):
        D.SegFolder(tmp_path, "gta5", split="val")


# ---------------------------------------------------------------- transforms, stats, cache


def test_resize_keeps_labels_nearest(tmp_path):
    truth = make_gta5(tmp_path, split_mat=False)
    ds = D.SegFolder(tmp_path, "gta5", size=(3, 5))
    item = ds[0]
    assert item["image"].shape == (3, 3, 5) and item["label"].shape == (3, 5)
    assert set(item["label"].unique().tolist()) <= set(np.unique(truth[item["name"]]).tolist())
    big = D.SegFolder(tmp_path, "gta5", size=(12, 20))[0]["label"].numpy()
    assert (big[::2, ::2] == truth["00001"]).all()


def test_random_crop_flip_keeps_image_and_label_aligned():
    h, w = 9, 13
    lab = torch.arange(h * w).reshape(h, w) % 19
    img = (lab.float() / 9 - 1).expand(3, h, w).clone()
    t = D.RandomCropFlip((5, 7), generator=torch.Generator().manual_seed(0))
    flips = 0
    for _ in range(20):
        x, y = t(img, lab)
        assert x.shape == (3, 5, 7) and y.shape == (5, 7)
        assert torch.equal(((x[0] + 1) * 9).round().long(), y)
        flips += int(y[0, 0] != lab[0, 0] and (y[0, 1] - y[0, 0]) % 19 == 18)
    assert 0 < flips < 20
    x, y = D.RandomCropFlip((12, 16), flip=False)(img, lab)  # padding: image 0, label ignore
    assert x.shape == (3, 12, 16) and (y[h:] == 255).all() and (y[:, w:] == 255).all()


def test_transform_argument_and_cache(tmp_path):
    make_gta5(tmp_path, split_mat=False)
    ds = D.SegFolder(tmp_path, "gta5", transform=D.RandomCropFlip((4, 4)), cache=True)
    item = ds[0]
    assert item["image"].shape == (3, 4, 4) and item["label"].shape == (4, 4)
    for p in (tmp_path / "images").glob("*.png"):
        p.unlink()
    ds[0]  # served from memory
    with pytest.raises(FileNotFoundError, match="00002.png"):
        ds[1]


def test_class_stats(tmp_path):
    truth = make_gta5(tmp_path, split_mat=False)
    stats = D.class_stats(D.SegFolder(tmp_path, "gta5"))
    assert list(stats.columns) == [*L.CLASS_NAMES, "ignore"]
    assert stats.sum(axis=1).eq(H * W).all()
    lab = truth["00002"]
    assert stats.loc["00002", "car"] == (lab == 13).sum() and stats.loc["00002", "ignore"] == (lab == 255).sum()


def test_write_translated_round_trip(tmp_path):
    labs = np.stack([rand_train() for _ in range(3)])
    imgs = np.stack([rand_image() for _ in range(3)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = D.write_translated(tmp_path / "tr", ["a", "b", "c"], x, torch.from_numpy(labs.astype(np.int64)))
    ids = np.asarray(Image.open(out / "labels" / "b.png"))
    assert (ids == L.train_to_label_ids(labs[1])).all()  # stored as Cityscapes label ids, like GTA5
    ds = D.SegFolder(out, "gta5")
    assert ds.names == ["a", "b", "c"]
    for i in range(3):
        assert (ds[i]["label"].numpy() == labs[i]).all()
        assert (D.to_uint8(ds[i]["image"]) == imgs[i]).all()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    D.write_translated(tmp_path / "u8", ["z"], imgs[:1], labs[:1])
    assert (np.asarray(Image.open(tmp_path / "u8" / "images" / "z.png")) == imgs[0]).all()
    with pytest.raises(ValueError, match="separator"):
        D.write_translated(tmp_path / "bad", ["x/y"], imgs[:1], labs[:1])
    with pytest.raises(ValueError, match="2 names"):
        D.write_translated(tmp_path / "bad", ["x", "y"], imgs[:1], labs[:1])
    with pytest.raises(ValueError, match="19"):
        D.write_translated(tmp_path / "bad", ["x"], imgs[:1], np.full((1, H, W), 19))


def test_subset_take_and_fingerprint(tmp_path):
    make_gta5(tmp_path, split_mat=False)
    ds = D.SegFolder(tmp_path, "gta5")
    sub = ds.take(2, seed=1)
    assert len(sub) == 2 and sub.names == ds.take(2, seed=1).names and set(sub.names) <= set(ds.names)
    assert ds.take(0) is ds
    assert ds.subset(["00003"]).names == ["00003"]
    assert ds.fingerprint() != sub.fingerprint() and ds.fingerprint() == D.SegFolder(tmp_path, "gta5").fingerprint()
    native = ds.load(0)[0].shape[:2]  # at its own size: the same object, so cached trainings are reused
    assert D.at_size(ds, native) is ds and D.at_size(ds, []) is ds
    half = D.at_size(ds, (native[0] // 2, native[1] // 2))
    assert half.load(0)[0].shape[:2] == (native[0] // 2, native[1] // 2) and half.names == ds.names
    assert half.fingerprint() != ds.fingerprint()


# ---------------------------------------------------------------- the 16-bit PNG reader


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _encode_all_filters(arr):
    """A reference PNG encoder that cycles through all five filter types row by row."""
    h, w, c = arr.shape
    bpp = 2 * c
    rows = arr.astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(int)
    out = []
    for y in range(h):
        ft, line = y % 5, [y % 5]
        for x in range(w * bpp):
            a = rows[y, x - bpp] if x >= bpp else 0
            b = rows[y - 1, x] if y else 0
            cc = rows[y - 1, x - bpp] if y and x >= bpp else 0
            line.append((rows[y, x] - [0, a, b, (a + b) // 2, _paeth(a, b, cc)][ft]) % 256)
        out.append(bytes(line))

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def test_png16_reader_undoes_every_filter(tmp_path):
    arr = RNG.integers(0, 65536, (11, 7, 3)).astype(np.uint16)
    (tmp_path / "f.png").write_bytes(_encode_all_filters(arr))
    assert (read_png(tmp_path / "f.png") == arr).all()
    (tmp_path / "g.png").write_bytes(encode_png16(arr[..., 0]))
    assert (read_png(tmp_path / "g.png")[..., 0] == arr[..., 0]).all()
    rgb = rand_image(9, 5)
    Image.fromarray(rgb).save(tmp_path / "h.png", optimize=True)
    assert (read_png(tmp_path / "h.png") == rgb).all()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png"):
        read_png(tmp_path / "bad.png")


# ---------------------------------------------------------------- benchmark sets


def test_benchmark_sets_toystreets(toy_cfg):
    sets = D.benchmark_sets(toy_cfg)
    want = {"source_train", "source_val", "target_train", "target_val"}
    want |= {f"{c}_{s}" for c in ("night", "fog", "rain", "snow") for s in ("train", "val")}
    assert set(sets) == want
    assert len(sets["source_train"]) == 8 and len(sets["target_val"]) == 4
    assert len(sets["fog_train"]) == 2 and len(sets["fog_val"]) == 4
    assert sets["source_train"].preset == "gta5" and sets["target_train"].preset == "cityscapes"
    assert sets["night_val"].preset == "acdc" and sets["night_val"].condition == "night"
    assert sets["source_val"][0]["image"].shape == (3, 32, 64)
    assert not set(sets["target_train"].names) & set(sets["target_val"].names)


def test_benchmark_sets_errors(tmp_path, toy_cfg):
    cfg = {"data": {**toy_cfg.data, "root": str(tmp_path / "none")}}
    with pytest.raises(FileNotFoundError, match="00_data_prep"):
        D.benchmark_sets(cfg)
    cfg = {"data": {**toy_cfg.data, "n_train": 9}}
    with pytest.raises(ValueError, match="n_train"):
        D.benchmark_sets(cfg)
    with pytest.raises(ValueError, match="dataset"):
        D.benchmark_sets({"data": {**toy_cfg.data, "dataset": "kitti"}})


def test_benchmark_sets_real_layouts(tmp_path):
    make_gta5(tmp_path / "gta5", n=4)
    make_cityscapes(tmp_path / "cityscapes", "train", "aachen", n=3)
    make_cityscapes(tmp_path / "cityscapes", "val", "lindau", n=2)
    cfg = {"data": {"dataset": "gta5-cityscapes", "root": str(tmp_path), "size": [4, 8], "n_train": 0, "n_val": 0,
                    "conditions": []}}
    sets = D.benchmark_sets(cfg)
    assert len(sets["source_val"]) == 1 and len(sets["target_train"]) == 3 and len(sets["target_val"]) == 2
    assert not set(sets["source_train"].names) & set(sets["source_val"].names)
    assert sets["target_val"][0]["label"].shape == (4, 8)
    for cond in ("fog", "night"):
        make_acdc(tmp_path / "acdc", cond, "train", n=2)
        make_acdc(tmp_path / "acdc", cond, "val", n=2)
    cfg = {"data": {"dataset": "cityscapes-acdc", "root": str(tmp_path), "size": None, "n_train": 2, "n_val": 0,
                    "conditions": ["fog", "night"]}}
    sets = D.benchmark_sets(cfg)
    assert sets["source_train"].preset == "cityscapes" and len(sets["source_train"]) == 2
    assert len(sets["target_val"]) == 4 and len(sets["fog_val"]) == 2 and len(sets["night_train"]) == 2


# ---------------------------------------------------------------- appearance statistics


def test_noise_level_measures_sensor_noise():
    flat = np.tile(np.linspace(0, 200, 64, dtype=np.float32), (48, 1))  # a smooth ramp: no noise
    assert D.noise_level(flat.astype(np.uint8)) < 1.0
    noisy = flat + np.random.default_rng(1).normal(0, 8, flat.shape)
    assert abs(D.noise_level(np.clip(noisy, 0, 255).astype(np.uint8)) - 8) < 1.5
    blocks = np.zeros((48, 64), np.uint8)
    blocks[:, 20:] = 200
    blocks[30:, 40:] = 90
    assert D.noise_level(blocks) == 0.0  # edges are not noise
    lab = (blocks > 0).astype(np.uint8)
    assert D.noise_level(np.clip(noisy, 0, 255).astype(np.uint8), lab) == pytest.approx(8, abs=1.5)
    with pytest.raises(ValueError, match="3x3"):
        D.noise_level(np.zeros((2, 9)))


def test_appearance_stats(tmp_path):
    lab = np.zeros((H, W), np.uint8)
    lab[:, W // 2:] = 10
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 2] = (100, 50, 0)
    img[:, W // 2:] = (0, 0, 250)
    img[::2, W // 2:] = (0, 0, 200)  # stripes: texture inside "sky" only
    D.write_translated(tmp_path, ["a"], img[None], lab[None])
    df = D.appearance_stats(D.SegFolder(tmp_path, "gta5"))
    road, sky = df.set_index("class").loc["road"], df.set_index("class").loc["sky"]
    assert (road.r, road.g, road.b, road.pixels) == (100, 50, 0, H * W // 2)
    assert sky.b == pytest.approx(225) and sky.gradient > 10 and road.gradient == 0  # boundary excluded
    assert list(df.columns) == ["name", "class", "pixels", "r", "g", "b", "gradient", "noise"]
