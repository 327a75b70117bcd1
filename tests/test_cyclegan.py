"""CycleGAN baseline: shapes, one training step, exact resume, the image pool, translation."""
import os
import shutil

import numpy as np
import pytest
import torch

from dasslab import cyclegan

from .test_kpn import H, W, scenes

os.environ.setdefault("TQDM_DISABLE", "1")


def tiny_cfg(**kw):
    base = {"iters": 2, "batch_size": 2, "ngf": 4, "n_blocks": 1, "ndf": 8, "n_layers": 2, "pool_size": 3}
    base.update(kw)
    return cyclegan.CycleGANConfig(**base)


@pytest.mark.parametrize("hw", [(H, W), (30, 62)])
def test_generator_and_discriminator_shapes(hw):
    torch.manual_seed(0)
    model = tiny_cfg().build()
    x = torch.rand(2, 3, *hw) * 2 - 1
    y = model(x)
    assert y.shape == x.shape and y.abs().max() <= 1.0
    assert model.g_ts(y).shape == x.shape
    d = model.d_t(x)
    assert d.shape[:2] == (2, 1) and d.shape[-1] > 1    # a grid of patch logits
    with pytest.raises(ValueError, match="ResnetGenerator"):
        model(torch.rand(2, 4, *hw))


def test_image_pool_keeps_history_and_is_seeded():
    pool = cyclegan.ImagePool(2)
    rng = np.random.default_rng(0)
    a = torch.zeros(2, 3, 4, 4)
    assert torch.equal(pool.query(a, rng), a) and len(pool.images) == 2   # filling: passes through
    out = [pool.query(torch.full((1, 3, 4, 4), float(i + 1)), rng) for i in range(20)]
    old = sum(int(o.abs().sum() == 0) for o in out)
    assert 0 < old < 20, "the pool must return a mix of stored and fresh images"
    st = pool.state()
    p2 = cyclegan.ImagePool(2)
    p2.load(st)
    assert torch.equal(p2.state(), st)
    assert torch.equal(cyclegan.ImagePool(0).query(a, rng), a)


def test_one_step_changes_both_generators():
    torch.manual_seed(0)
    cfg = tiny_cfg(iters=1)
    ref = cfg.build().state_dict()
    torch.manual_seed(0)
    model, hist = cyclegan.train_cyclegan(scenes(4), scenes(4, shift=0.3, noise=0.1, seed=1), cfg, device="cpu")
    assert len(hist) == 1 and np.isfinite(hist[["loss_g", "d_target", "d_source"]].to_numpy()).all()
    for part in ("g_st", "g_ts", "d_t", "d_s"):
        k = next(k for k in ref if k.startswith(part) and k.endswith("weight"))
        assert not torch.equal(model.state_dict()[k], ref[k]), f"{part} did not train"


def test_resume_is_exact_and_checkpoints_are_refused_for_another_config(tmp_path):
    src, tgt = scenes(4), scenes(4, shift=0.3, noise=0.1, seed=1)
    cfg = tiny_cfg(iters=4, ckpt_every=2)
    full, h_full = cyclegan.train_cyclegan(src, tgt, cfg, out_dir=tmp_path, device="cpu")
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")      # interrupted after step 2
    resumed, h_res = cyclegan.train_cyclegan(src, tgt, cfg, out_dir=tmp_path, device="cpu")
    torch.testing.assert_close(resumed.state_dict(), full.state_dict(), rtol=0, atol=0)
    np.testing.assert_allclose(h_res["loss_g"], h_full["loss_g"])
    g = cyclegan.load_generator(tmp_path, device="cpu")
    x = src[0]["image"][None]
    torch.testing.assert_close(g(x), full.g_st(x))
    with pytest.raises(ValueError, match="another training config"):
        cyclegan.train_cyclegan(src, tgt, tiny_cfg(iters=6, lambda_cycle=3.0), out_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="n_layers"):
        cyclegan.train_cyclegan(src, tgt, tiny_cfg(n_layers=4), device="cpu")


def test_translate_dataset_writes_a_gta5_set(tmp_path):
    from dasslab import datasets

    torch.manual_seed(0)
    g = tiny_cfg().build().g_st
    src = scenes(3)
    meta = cyclegan.translate_dataset(g, src, tmp_path / "cg", batch_size=2, device="cpu")
    assert meta["method"] == "cyclegan" and meta["n_images"] == 3
    ds = datasets.SegFolder(tmp_path / "cg", preset="gta5")
    assert ds.names == [it["name"] for it in src]
    assert torch.equal(ds[1]["label"], src[1]["label"])
    with torch.no_grad():
        ref = g(src[1]["image"][None])[0]
    assert (ds[1]["image"] - ref).abs().max() <= 1.0 / 127.5 + 1e-6
