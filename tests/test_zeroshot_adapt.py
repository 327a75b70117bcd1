"""ZoDi adaptation: pairs, the loss, and the data lineage of the whole protocol (no target image used)."""
from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dasslab import datasets, runs, seg, toystreets
from dasslab.zeroshot import adapt, embedded, protocol, workbook
from dasslab.zeroshot.adapt import PairedDataset, ZoDiLoss

SIZE = (32, 64)


class _Set(torch.utils.data.Dataset):
    def __init__(self, images, labels, names, root="mem"):
        self.images, self.labels, self._names, self.root = images, labels, names, root

    names = property(lambda self: list(self._names))

    def __len__(self):
        return len(self._names)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "name": self._names[i]}


def _pair_sets(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 32, generator=g) * 2 - 1
    y = torch.randint(0, 19, (n, 16, 32), generator=g)
    names = [f"im{i}" for i in range(n)]
    return _Set(x, y, names, "src"), _Set(-x.flip(0), y.flip(0), names[::-1], "tr")


def test_paired_dataset_matches_by_name_and_checks():
    src, tr = _pair_sets()
    pd_ = PairedDataset(src, tr)
    item = pd_[1]
    assert set(item) == {"image", "image_t", "label", "name"} and item["name"] == "im1"
    assert torch.equal(item["image_t"], -src.images[1]) and torch.equal(item["label"], src.labels[1])
    with pytest.raises(ValueError, match="im3"):
        PairedDataset(src, _Set(tr.images[1:], tr.labels[1:], tr._names[1:]))
    bad = _Set(tr.images, torch.zeros_like(tr.labels), tr._names)
    with pytest.raises(ValueError, match="labels of 'im0' differ"):
        PairedDataset(src, bad)
    assert pd_.roots() == ["src", "tr"]


def test_train_loop_augments_a_pair_alike():
    src, _ = _pair_sets()
    same = PairedDataset(src, src)
    batch = seg.collate([same[i] for i in range(4)])
    tc = seg.TrainConfig(iters=1, batch_size=4, crop=(8, 16), flip=True, seed=3)
    out = seg.augment(batch, tc, step=5)
    assert out["image"].shape[-2:] == (8, 16)
    assert torch.equal(out["image"], out["image_t"])  # same crop and flip on both images of a pair


def test_zodi_loss_is_ce_plus_ce_minus_cosine():
    torch.manual_seed(0)
    model = seg.build_segmenter("unet-small", width=4, depth=2).eval()
    src, tr = _pair_sets()
    batch = seg.collate([PairedDataset(src, tr)[i] for i in range(4)])
    loss, logs = ZoDiLoss("zodi", 0.1)(model, batch)
    x, xt, y = batch["image"], batch["image_t"], batch["label"]
    ce = F.cross_entropy(model(x), y, ignore_index=255) + F.cross_entropy(model(xt), y, ignore_index=255)
    za, zb = model.forward_features(x).mean((2, 3)), model.forward_features(xt).mean((2, 3))
    cos = F.cosine_similarity(za, zb, dim=1).mean()
    assert torch.allclose(loss, ce - 0.1 * cos, atol=1e-5)
    assert set(logs) == {"ce_source", "ce_transfer", "cos"}
    t_loss, t_logs = ZoDiLoss("transfer")(model, batch)
    assert torch.allclose(t_loss, ce, atol=1e-5) and "cos" not in t_logs
    s_loss, _ = ZoDiLoss("source-only")(model, {"image": x, "label": y})
    assert torch.allclose(s_loss, F.cross_entropy(model(x), y, ignore_index=255), atol=1e-5)
    # the similarity term alone reaches the backbone
    model.zero_grad()
    (-adapt.feature_similarity(model, x, xt)).backward()
    assert model.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="variant"):
        ZoDiLoss("cycle")


# ------------------------------------------------------------------------------------- lineage
class _FlipBackend:
    """A stand-in generator for the lineage test: inverts colours (reads nothing from disk)."""

    name = "flip"

    def transfer(self, images, labels, prompt, strength, generator=None):
        return -images

    def settings(self):
        return {"backend": "flip"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toystreets.generate(root, SIZE, n_train=8, n_val=4, seed=0, conditions=("night", "fog"), progress=False)
    cfg = runs.Config.wrap({
        "profile": "test", "device": "cpu", "run_dir": str(root / "run"),
        "data": {"dataset": "toystreets", "root": str(root), "size": list(SIZE), "n_train": 8, "n_val": 4,
                 "seed": 0, "conditions": ["night", "fog"], "cache": False},
        "seg": {"model": "unet-small", "model_kwargs": {"width": 4, "depth": 2}, "iters": 2, "batch_size": 4,
                "lr": 1e-3, "weight_decay": 0.0, "seeds": [0]},
        "nb": {"prompts": {"night": "driving at night"}, "strengths": {"night": 0.9}, "transfer_batch": 4},
    })
    return root, cfg


def test_adaptation_reads_no_target_image(bench, monkeypatch):
    """Record every file opened while transferring and adapting: none may lie under the adverse
    (ACDC-layout) folders; only evaluation may read them."""
    from dasslab.seg import downstream

    root, cfg = bench
    rd = runs.RunDir(cfg.run_dir)
    sets = datasets.benchmark_sets(cfg, cache=False)
    opened: list[tuple[str, str]] = []
    phase = {"now": "adapt"}
    real_open, real_io_open = builtins.open, io.open

    def recording_open(file, *a, **k):
        if isinstance(file, (str, Path)):
            opened.append((phase["now"], str(Path(file).resolve())))
        return real_open(file, *a, **k)

    real_eval = downstream.evaluate

    def evaluating(*a, **k):
        phase["now"] = "evaluate"
        try:
            return real_eval(*a, **k)
        finally:
            phase["now"] = "adapt"

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(downstream, "evaluate", evaluating)

    source = protocol.source_set(sets, cfg)
    assert Path(source.root) == (root / "cityscapes").resolve()
    transferred = workbook.transfer_conditions(cfg, rd, _FlipBackend(), source, ["night"], progress=False)["night"]
    table = protocol.evaluate_condition(rd, cfg, sets, "night", transferred,
                                        variants=("source-only", "transfer", "zodi"), seeds=[0])
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(io, "open", real_io_open)

    adverse = str((root / "acdc").resolve())
    adapt_files = [p for ph, p in opened if ph == "adapt"]
    assert not [p for p in adapt_files if p.startswith(adverse)], "adaptation read adverse-condition files"
    assert any(p.startswith(str((root / "cityscapes").resolve())) and p.endswith("_leftImg8bit.png")
               for p in adapt_files)
    assert any(p.startswith(str(Path(rd.translated("zodi_night")).resolve())) for p in adapt_files)
    # the recorder works: evaluation does read the night val split (and only val)
    eval_files = [p for ph, p in opened if ph == "evaluate" and p.startswith(adverse)]
    assert eval_files and all("/val/" in p and "/night/" in p for p in eval_files)
    assert set(table["method"]) == {"source-only", "transfer", "zodi"}
    assert (table["class"] == "mIoU").sum() == 3

    # the transferred set is in the source layout with the source labels, and it is reused
    rec = json.loads((rd.translated("zodi_night") / "translation.json").read_text())
    assert rec["params"]["prompt"] == "driving at night" and rec["params"]["strength"] == 0.9
    for i in range(len(source)):
        assert torch.equal(transferred[i]["label"], source[i]["label"])
        assert torch.allclose(transferred[i]["image"], -source[i]["image"], atol=1 / 127)
    stamp = (rd.translated("zodi_night") / "translation.json").stat().st_mtime_ns
    workbook.transfer_conditions(cfg, rd, _FlipBackend(), source, ["night"], progress=False)
    assert (rd.translated("zodi_night") / "translation.json").stat().st_mtime_ns == stamp


def test_summary_and_beats():
    import pandas as pd

    rows = []
    for m, vals in (("source-only", [10, 11, 12]), ("zodi", [20, 21, 22]), ("transfer", [11, 12, 13])):
        rows += [("night", m, s, "mIoU", v) for s, v in enumerate(vals)]
    t = pd.DataFrame(rows, columns=["condition", "method", "seed", "class", "IoU"])
    s = protocol.summary_table(t)
    assert s.set_index("method").loc["zodi", "gain"] == pytest.approx(10)
    assert protocol.beats(s, "night", "zodi") and not protocol.beats(s, "night", "transfer")


def test_embedded_settings_come_from_the_profile(tmp_path):
    cfg = runs.load_config("tiny", notebook="04_zero_shot_zodi", run_dir=tmp_path / "run")
    ecfg = workbook.embedded_config(cfg)
    assert list(ecfg.size) == list(cfg.data.size)
    rd = runs.RunDir(cfg.run_dir)
    assert workbook.embedded_dir(cfg, rd).name == f"embedded-{ecfg.key()[:12]}"
    for c in cfg.data.conditions:
        assert workbook.prompt_for(cfg, c) and 0 < workbook.strength_for(cfg, c) <= 1
    with pytest.raises(FileNotFoundError, match="04_zero_shot_zodi"):
        workbook.build_backend(cfg, rd)
    assert isinstance(ecfg, embedded.EmbeddedConfig)
