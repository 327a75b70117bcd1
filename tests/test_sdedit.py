"""SDEdit translation (dasslab.diffusion.sdedit): strength semantics, seeding, the written set, resume, CLI."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dasslab import cli, datasets
from dasslab.diffusion import sampling, sdedit

H, W = 8, 16


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=(H, W), block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


@pytest.fixture()
def source(tmp_path):
    """Five labelled source images in GTA5 layout, read back with SegFolder."""
    g = torch.Generator().manual_seed(0)
    n = 5
    lab = torch.zeros(n, H, W, dtype=torch.long)
    lab[:, : H // 2] = 10          # sky
    lab[:, H // 2:, : W // 2] = 13  # car
    lab[:, 0, 0] = 255
    img = (torch.rand(n, 3, H, W, generator=g) * 2 - 1)
    names = [f"src_{i:02d}" for i in range(n)]
    datasets.write_translated(tmp_path / "src", names, img, lab)
    return datasets.SegFolder(tmp_path / "src", "gta5")


def _read(folder):
    ds = datasets.SegFolder(folder, "gta5")
    return {ds[i]["name"]: (ds[i]["image"], ds[i]["label"]) for i in range(len(ds))}


def test_strength_zero_returns_the_input(pipe):
    x = torch.rand(2, 3, H, W) * 2 - 1
    for steps in (None, 10):
        out = sdedit.sdedit(pipe.unet, pipe.scheduler, x, 0.0, torch.Generator().manual_seed(0), steps=steps)
        torch.testing.assert_close(out, x)


def test_strength_moves_further_from_the_source(pipe):
    x = torch.rand(4, 3, H, W) * 2 - 1
    dist = [float((sdedit.sdedit(pipe.unet, pipe.scheduler, x, s, sampling.generators(range(4)), steps=20) - x)
                  .abs().mean()) for s in (0.05, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2]


@pytest.mark.parametrize("steps", [None, 10])
def test_per_image_seeds_do_not_depend_on_the_batch(pipe, steps):
    x = torch.rand(3, 3, H, W) * 2 - 1
    seeds = [sdedit.image_seed(0, f"n{i}") for i in range(3)]
    together = sdedit.sdedit(pipe.unet, pipe.scheduler, x, 0.3, sampling.generators(seeds), steps=steps)
    alone = sdedit.sdedit(pipe.unet, pipe.scheduler, x[1:2], 0.3, sampling.generators(seeds[1:2]), steps=steps)
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=1e-6)
    assert sdedit.image_seed(0, "a") != sdedit.image_seed(1, "a") != sdedit.image_seed(0, "b")


def test_translate_dataset_writes_gta5_layout_with_source_labels(pipe, source, tmp_path):
    out = tmp_path / "sdedit"
    rec = sdedit.translate_dataset(pipe, None, source, out, strength=0.3, batch_size=2, seed=0, steps=10,
                                   progress=False)
    assert rec["n_images"] == 5 and rec["strength"] == 0.3 and rec["sampler"] == "ddim" and rec["seed"] == 0
    assert rec["reverse_steps"] == 3 and rec["seconds_per_image"] > 0 and rec["method"] == "sdedit"
    assert json.loads((out / "translation.json").read_text())["t_start"] == 29
    got, src = _read(out), _read(source.root)
    assert sorted(got) == source.names
    for name, (img, lab) in got.items():
        assert torch.equal(lab, src[name][1])           # labels are the source labels
        assert not torch.equal(img, src[name][0])       # images are translated
    back = sdedit.translated_set(out)
    assert len(back) == 5 and back[0]["image"].shape == (3, H, W)
    # batch size does not change the result
    sdedit.translate_dataset(pipe, None, source, tmp_path / "b1", 0.3, batch_size=1, seed=0, steps=10, progress=False)
    for name, (img, _) in _read(tmp_path / "b1").items():
        assert torch.equal(img, got[name][0])


def test_translate_dataset_at_strength_zero_copies_the_images(pipe, source, tmp_path):
    sdedit.translate_dataset(pipe, None, source, tmp_path / "s0", 0.0, batch_size=4, progress=False)
    got, src = _read(tmp_path / "s0"), _read(source.root)
    for name in src:
        torch.testing.assert_close(got[name][0], src[name][0], atol=1 / 127.5, rtol=0)


def test_translate_dataset_resumes_and_restarts_on_new_settings(pipe, source, tmp_path):
    out = tmp_path / "sd"
    sdedit.translate_dataset(pipe, None, source, out, 0.3, batch_size=2, steps=10, progress=False)
    first = _read(out)
    (out / "images" / "src_03.png").unlink()
    (out / "translation.json").unlink()
    kept = (out / "images" / "src_01.png").stat().st_mtime_ns
    calls = []
    sdedit.translate_dataset(pipe, None, source, out, 0.3, batch_size=2, steps=10, progress=False,
                             make_guidance=lambda b: calls.append(list(b["name"])))
    assert calls == [["src_03"]]                              # only the missing image was redone
    assert (out / "images" / "src_01.png").stat().st_mtime_ns == kept
    again = _read(out)
    assert all(torch.equal(again[k][0], first[k][0]) for k in first)
    sdedit.translate_dataset(pipe, None, source, out, 0.6, batch_size=5, steps=10, progress=False,
                             make_guidance=lambda b: calls.append(list(b["name"])))
    assert calls[-1] == source.names                          # new strength: everything again
    assert json.loads((out / "translation.json").read_text())["strength"] == 0.6


def test_make_guidance_gets_labels_and_can_steer(pipe, source, tmp_path):
    seen = {}

    def make(batch):
        seen["label"] = batch["label"]

        def hook(state):
            return state.mean + 0.5   # push every step brighter
        return hook

    sdedit.translate_dataset(pipe, None, source, tmp_path / "g", 0.5, batch_size=5, steps=10, progress=False,
                             make_guidance=make, method="guided", params={"scale": 0.5})
    sdedit.translate_dataset(pipe, None, source, tmp_path / "p", 0.5, batch_size=5, steps=10, progress=False)
    assert seen["label"].shape == (5, H, W)
    g, p = _read(tmp_path / "g"), _read(tmp_path / "p")
    assert np.mean([float(g[k][0].mean() - p[k][0].mean()) for k in g]) > 0.1
    assert json.loads((tmp_path / "g" / "translation.json").read_text())["params"] == {"scale": 0.5}


def test_translate_dataset_errors(pipe, source, tmp_path):
    with pytest.raises(ValueError, match="strength"):
        sdedit.translate_dataset(pipe, None, source, tmp_path / "x", 1.2, progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        sdedit.translate_dataset(pipe.unet, None, source, tmp_path / "x", 0.5, progress=False)
    big = datasets.SegFolder(source.root, "gta5", size=(16, 32))
    with pytest.raises(ValueError, match="trained at"):
        sdedit.translate_dataset(pipe, None, big, tmp_path / "x", 0.5, progress=False)
    nolab = datasets.SegFolder(source.root, "gta5", with_labels=False)
    with pytest.raises(ValueError, match="no labels"):
        sdedit.translate_dataset(pipe, None, nolab, tmp_path / "x", 0.5, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        sdedit.reverse_scheduler(pipe.scheduler, 10, "euler")


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["sdedit", "--strength", "0.5"])               # --run-dir is required
    assert "--run-dir" in capsys.readouterr().err
    rc = cli.main(["sdedit", "--profile", "tiny", "--run-dir", str(tmp_path), "--strength", "1.5"])
    assert rc == 2 and "--strength" in capsys.readouterr().err
    rc = cli.main(["sdedit", "--profile", "tiny", "--run-dir", str(tmp_path), "--strength", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "01_target_diffusion" in err           # no DDPM yet: names the notebook to run


def test_cli_translates_the_source_set(tmp_path, capsys, monkeypatch):
    from dasslab import toystreets

    root = tmp_path / "toy"
    toystreets.generate(root, size=(32, 64), n_train=24, n_val=8, seed=0,
                        conditions=["night", "fog", "rain", "snow"], progress=False)
    monkeypatch.setenv("DASSLAB_DATA_ROOT", str(root))
    run = tmp_path / "run"
    assert cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", str(run), "--steps", "2"]) == 0
    assert cli.main(["sdedit", "--profile", "tiny", "--run-dir", str(run), "--strength", "0.3", "--steps", "4",
                     "--batch-size", "10"]) == 0
    out = run / "artifacts" / "translated" / "sdedit"
    rec = sdedit.read_record(out)
    assert rec["n_images"] == 24 and rec["strength"] == 0.3 and rec["reverse_steps"] == 1
    ds = datasets.SegFolder(out, "gta5")
    src = datasets.SegFolder(root / "gta5", "gta5", split="train")
    assert ds.names == src.names
    assert torch.equal(ds[3]["label"], src[3]["label"])
