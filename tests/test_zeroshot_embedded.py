"""Embedded backend: text encoder, corpus, pretraining (resume, cache), transfer; shared inversion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dasslab import toystreets
from dasslab.zeroshot import embedded as emb
from dasslab.zeroshot.backends import colour_layout, make_backend, one_hot_layout
from dasslab.zeroshot.inversion import start_index, stochastic_inversion_transfer
from dasslab.zeroshot.text import CAPTIONS, ZODI_PROMPTS, SentenceEncoder, captions_for

TINY = {"size": (16, 32), "channels": (8, 16), "n_corpus": 20, "iters": 6, "batch_size": 4, "ckpt_every": 3,
            "conditions": ("day", "night", "fog"), "warmup_iters": 2}


# ------------------------------------------------------------------------------------- inversion
def test_inversion_starts_from_conditioned_renoise_then_guided_ddim():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def eps_fn(x, t, scale):
        calls.append((int(t), scale))
        return fixed

    out, start = stochastic_inversion_transfer(x0, eps_fn, sched, 20, 0.65, 9.0, torch.Generator().manual_seed(2),
                                               eta=1.0, return_start=True)
    k = int(0.65 * 20)
    assert start_index(20, 0.65) == 20 - k
    t_start = int(sched.timesteps[20 - k])
    assert abs(t_start - 0.65 * 1000) <= 1000 / 20  # t ~ strength * T
    # first call: the conditioned model at t_start, no guidance; then k guided DDIM steps
    assert calls[0] == (t_start, 1.0)
    assert [c[1] for c in calls[1:]] == [9.0] * k and calls[1][0] == t_start
    # the start point is x0 re-noised with the *predicted* noise, not the random draw
    expect = sched.add_noise(x0, fixed, torch.tensor([t_start]))
    assert torch.allclose(start, expect, atol=1e-6)
    assert out.shape == x0.shape
    same = stochastic_inversion_transfer(x0, lambda x, t, s: fixed, sched, 20, 0.0, 9.0)
    assert torch.equal(same, x0)
    with pytest.raises(ValueError, match="strength"):
        start_index(20, 1.5)


def test_layout_encodings():
    lab = torch.tensor([[[0, 13, 255], [10, 2, 18]]])
    oh = one_hot_layout(lab)
    assert oh.shape == (1, 20, 2, 3) and torch.equal(oh.sum(1), torch.ones(1, 2, 3))
    assert oh[0, 19, 0, 2] == 1  # ignore plane
    col = colour_layout(lab)
    assert col.shape == (1, 3, 2, 3)
    assert torch.allclose(col[0, :, 0, 0] * 255, torch.tensor([128.0, 64.0, 128.0]))  # road colour
    assert torch.equal(col[0, :, 0, 2], torch.zeros(3))  # void is black, as in *_gtFine_color.png


# ------------------------------------------------------------------------------------- text
def test_eval_prompts_are_held_out_and_understood():
    every = {c for caps in CAPTIONS.values() for c in caps}
    for p in ZODI_PROMPTS.values():
        assert p not in every
    enc = SentenceEncoder()
    e = enc.encode(["driving at night", "driving at night"])
    assert e.shape == (2, 384) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-4)
    for cond in ("night", "fog", "rain", "snow"):
        top = enc.nearest_captions(ZODI_PROMPTS[cond], k=3)
        assert [c for c, _, _ in top].count(cond) >= 2, (cond, top)
    assert len(captions_for("fog", "source")) > 0
    with pytest.raises(ValueError, match="condition"):
        captions_for("hail")


# ------------------------------------------------------------------------------------- corpus
def test_corpus_is_outside_every_split():
    ecfg = emb.EmbeddedConfig(**TINY)
    c = emb.render_corpus(ecfg, progress=False)
    assert c["images"].shape == (20, 16, 32, 3) and c["labels"].shape == (20, 16, 32)
    assert c["seeds"].min() >= toystreets.CORPUS_SEED_OFFSET
    split_max = max(r.stop for r in toystreets.split_seeds(10_000, 10_000).values())
    assert split_max <= toystreets.CORPUS_SEED_OFFSET
    assert set(c["cell"].tolist()) == {0, 1, 2}
    img, lab = toystreets.render(int(c["seeds"][4]), (16, 32), "target", emb.corpus_cells(ecfg)[c["cell"][4]][1])
    assert np.array_equal(img, c["images"][4]) and np.array_equal(lab, c["labels"][4])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="prediction_type"):
        emb.EmbeddedConfig(prediction_type="x0")
    with pytest.raises(KeyError, match="channelz"):
        emb.EmbeddedConfig.from_dict({"channelz": [8]})
    with pytest.raises(ValueError, match="domains"):
        emb.EmbeddedConfig(domains=("photo",))


# ------------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "model"
    emb.pretrain(emb.EmbeddedConfig(**TINY), out, progress=False, device="cpu")
    return out


def test_pretrain_writes_a_complete_cached_model(tiny_model):
    meta = json.loads((tiny_model / "config.json").read_text())
    assert meta["key"] == emb.EmbeddedConfig(**TINY).key()
    assert not (tiny_model / "checkpoints").exists()
    hist = (tiny_model / "history.csv").read_text().strip().splitlines()
    assert len(hist) == 1 + TINY["iters"]
    stamp = (tiny_model / emb.MODEL_FILE).stat().st_mtime_ns
    emb.pretrain(emb.EmbeddedConfig(**TINY), tiny_model, progress=False)  # cached: nothing retrained
    assert (tiny_model / emb.MODEL_FILE).stat().st_mtime_ns == stamp
    assert emb.cache_dir_for("/c", emb.EmbeddedConfig(**TINY)) != emb.cache_dir_for(
        "/c", emb.EmbeddedConfig(**{**TINY, "iters": 7}))


def test_pretrain_resumes_exactly(tmp_path, tiny_model, monkeypatch):
    from safetensors.torch import load_file

    real = emb._checkpoint

    def crash_after_checkpoint(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(emb, "_checkpoint", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        emb.pretrain(emb.EmbeddedConfig(**TINY), tmp_path / "m", progress=False, device="cpu")
    assert not emb.is_complete(tmp_path / "m") and emb._ckpts(tmp_path / "m" / "checkpoints")
    monkeypatch.setattr(emb, "_checkpoint", real)
    emb.pretrain(emb.EmbeddedConfig(**TINY), tmp_path / "m", progress=False, device="cpu")
    a, b = load_file(tmp_path / "m" / emb.MODEL_FILE), load_file(tiny_model / emb.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_missing_model_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        emb.load_model(tmp_path)


# ------------------------------------------------------------------------------------- transfer
@pytest.fixture(scope="module")
def backend(tiny_model):
    return make_backend("embedded", model_dir=tiny_model, device="cpu", num_inference_steps=5, guidance_scale=3.0)


def _batch():
    imgs, labs = [], []
    for i in range(2):
        im, lab = toystreets.render(i, (16, 32), "target", "day")
        imgs.append(torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1)
        labs.append(torch.from_numpy(lab.astype(np.int64)))
    return torch.stack(imgs), torch.stack(labs)


def test_embedded_transfer_shape_seed_layout_prompt(backend):
    x, y = _batch()
    g = lambda s: torch.Generator().manual_seed(s)
    a = backend.transfer(x, y, "driving at night", 0.8, g(42))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, backend.transfer(x, y, "driving at night", 0.8, g(42)))
    assert not torch.allclose(a, backend.transfer(x, y, "driving at night", 0.8, g(1)))
    assert (a - backend.transfer(x, y.flip(-1), "driving at night", 0.8, g(42))).abs().mean() > 1e-4
    assert (a - backend.transfer(x, y, "driving in fog", 0.8, g(42))).abs().mean() > 1e-5
    assert torch.equal(backend.transfer(x, y, "driving in fog", 0.0, g(42)), x)
    big = backend.transfer(torch.nn.functional.interpolate(x, scale_factor=2), y.repeat_interleave(2, 1)
                           .repeat_interleave(2, 2), "driving at night", 0.5, g(0))
    assert big.shape == (2, 3, 32, 64)  # other sizes: resized to the model's and back
    with pytest.raises(ValueError, match="labels"):
        backend.transfer(x, y[:, :4], "driving at night", 0.5, g(0))
    assert backend.settings()["model_key"] == emb.EmbeddedConfig(**TINY).key()


def test_strength_sweep_table(backend):
    from dasslab import seg
    from dasslab.zeroshot import workbook

    x, y = _batch()
    items = [{"image": x[i], "label": y[i], "name": f"n{i}"} for i in range(2)]
    batch = workbook.sample_batch(items, 2, seed=0)
    assert torch.equal(batch["image"], x) and batch["name"] == ["n0", "n1"]
    ref = seg.build_segmenter("unet-small", width=4, depth=2)
    table, images = workbook.strength_sweep(backend, batch, "driving at night", [0.0, 0.5, 1.0], seed=1,
                                            reference=ref, look_images=-x)
    assert list(table.strength) == [0.0, 0.5, 1.0] and set(images) == {0.0, 0.5, 1.0}
    assert {"label_consistency", "kid_to_look", "kid_to_source", "mean_abs_change"} <= set(table.columns)
    assert table.mean_abs_change[0] == 0 and table.mean_abs_change[2] > table.mean_abs_change[1] > 0
    assert table.label_consistency.between(0, 100).all()
