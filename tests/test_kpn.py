"""DA-KPN: the translation function, the predictor's identity start, training, resume, translation."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from dasslab import kpn
from dasslab.kpn import common, ops

os.environ.setdefault("TQDM_DISABLE", "1")
H, W = 32, 64


class TinySeg(nn.Module):
    """Stand-in for the frozen source segmenter: 19 logits from the colour (with BatchNorm, to check
    that training never moves its statistics)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 19, 3, padding=1)
        self.seg_config = {"name": "tiny", "num_classes": 19, "kwargs": {}}

    def forward(self, x):
        return self.conv(self.bn(x))


def scenes(n, shift=0.0, noise=0.0, seed=0):
    """Flat two-class scenes (road below, sky above, a building block) as dataset items."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        lab = torch.full((H, W), 10, dtype=torch.long)          # sky
        lab[H // 2:] = 0                                        # road
        c = 8 + (i * 7) % 30
        lab[6:H // 2, c:c + 12] = 2                             # building
        pal = torch.tensor([[-.3, -.3, -.3], [0, 0, 0], [.5, .1, -.2]] + [[0, 0, 0]] * 7 + [[-.2, .3, .9]])
        img = pal[lab].permute(2, 0, 1) + shift + noise * torch.randn(3, H, W, generator=g)
        items.append({"image": img.clamp(-1, 1), "label": lab, "name": f"scene_{i:03d}"})
    return items


def small_cfg(**kw):
    base = {"iters": 2, "batch_size": 4, "lr": 1e-3, "ndf": 8, "n_layers": 2, "kernel_size": 5}
    base.update(kw)
    return kpn.KPNConfig(**base)


def make_model(**kw):
    torch.manual_seed(0)
    return kpn.train.build_model(TinySeg(), (H, W), small_cfg(**kw))


# ---------------------------------------------------------------------------------- the function
def test_hsv_round_trip_and_reference():
    from matplotlib.colors import rgb_to_hsv as mpl_rgb_to_hsv

    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 16, dtype=torch.float64)
    x[0, :, 0, :4] = 0.5                        # greys: hue undefined -> 0
    x[0, :, 1, 0] = torch.tensor([1.0, 0, 0])   # primaries
    x[0, :, 1, 1] = torch.tensor([0, 1.0, 0])
    x[0, :, 1, 2] = torch.tensor([0, 0, 1.0])
    x[0, :, 1, 3] = 0.0                         # black
    hsv = ops.rgb_to_hsv(x)
    ref = mpl_rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(hsv.permute(0, 2, 3, 1).numpy(), ref, atol=1e-9)
    torch.testing.assert_close(ops.hsv_to_rgb(hsv), x, atol=1e-9, rtol=0)


def test_hsv_affine_shifts_hue_and_wraps():
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # pure red, hue 0
    ones, zero = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    green = ops.hsv_affine(x, ones, torch.tensor([1 / 3, 0, 0]).view(1, 3, 1, 1))
    torch.testing.assert_close(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    wrapped = ops.hsv_affine(x, ones, torch.tensor([-2 / 3, 0, 0]).view(1, 3, 1, 1))  # -> hue 1/3 again
    torch.testing.assert_close(wrapped, green, atol=1e-6, rtol=0)
    darker = ops.hsv_affine(x, torch.tensor([1, 1, 0.5]).view(1, 3, 1, 1), zero)
    torch.testing.assert_close(darker.flatten(), torch.tensor([0.5, 0.0, 0.0]))


@pytest.mark.parametrize("sigma", [0.8, 1.7])
def test_blur_matches_scipy_on_constant_sigma(sigma):
    from scipy import ndimage

    torch.manual_seed(1)
    k = 7
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    y = ops.spatial_gaussian_blur(x, torch.full_like(x, sigma), k)
    ref = np.stack([[ndimage.gaussian_filter(x[b, c].numpy(), sigma, mode="nearest", truncate=(k // 2) / sigma)
                     for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-12)
    # the row-blocked path (bounded memory) gives the same result
    torch.testing.assert_close(ops.spatial_gaussian_blur(x, torch.full_like(x, sigma), k, max_elements=500), y)


def test_blur_sigma_zero_is_identity_and_has_gradient():
    x = torch.rand(1, 3, 10, 12)
    s = torch.zeros_like(x, requires_grad=True)
    y = ops.spatial_gaussian_blur(x, s, 5)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    assert s.grad.abs().sum() > 0, "no gradient reaches sigma at the identity"


def test_spatially_varying_blur_only_blurs_where_sigma_is_large():
    torch.manual_seed(2)
    x = torch.rand(1, 3, 16, 32)
    s = torch.zeros_like(x)
    s[..., :16] = 2.0                       # left half blurred, right half sharp
    y = ops.spatial_gaussian_blur(x, s, 7)
    assert torch.equal(y[..., 16:], x[..., 16:])
    assert y[..., :13].std() < 0.6 * x[..., :13].std()
    # a channel-wise sigma blurs only that channel
    s2 = torch.zeros_like(x)
    s2[:, 1] = 2.0
    y2 = ops.spatial_gaussian_blur(x, s2, 7)
    assert torch.equal(y2[:, [0, 2]], x[:, [0, 2]]) and not torch.equal(y2[:, 1], x[:, 1])


def test_bad_inputs_name_the_culprit():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.spatial_gaussian_blur(x, torch.zeros_like(x), 4)
    with pytest.raises(ValueError, match="sigma map"):
        ops.spatial_gaussian_blur(x, torch.zeros(1, 3, 8, 7), 5)
    with pytest.raises(ValueError, match="params"):
        ops.apply_translation(x, torch.zeros(1, 11, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="KernelPredictor"):
        kpn.KernelPredictor(19)(torch.zeros(1, 18, 4, 4))
    with pytest.raises(ValueError, match="n_layers"):
        kpn.train.train_kpn(TinySeg(), scenes(2), scenes(2), small_cfg(n_layers=3))


# ---------------------------------------------------------------------------------- the model
def test_identity_init_returns_the_input():
    model = make_model()
    x = torch.stack([it["image"] for it in scenes(3, noise=0.2)])
    p = model.params(x)
    torch.testing.assert_close(p, torch.tensor(ops.IDENTITY).view(1, 12, 1, 1).expand_as(p))
    torch.testing.assert_close(model(x), x, atol=1e-5, rtol=0)


def test_deeper_kpn_also_starts_at_identity():
    model = make_model(hidden=16)
    x = torch.stack([it["image"] for it in scenes(2, noise=0.2)])
    torch.testing.assert_close(model(x), x, atol=1e-5, rtol=0)


def _random_head(model, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.predictor.head.weight.copy_(scale * torch.randn(model.predictor.head.weight.shape, generator=g))
    return model


def test_geometry_is_preserved():
    """Output at a pixel depends only on source pixels within the kernel radius (given the parameter
    maps), and a class border stays where the label puts it."""
    model = _random_head(make_model()).eval()
    x = torch.stack([it["image"] for it in scenes(1)])
    p = model.params(x)
    noise = model.noise
    f = lambda img: ops.apply_translation((img + 1) / 2, p, noise, model.kernel_size, model.sigma_min)
    y0 = f(x)
    x1 = x.clone()
    x1[0, :, 20, 30] += 0.5
    changed = (f(x1) - y0).abs().sum(1)[0] > 0
    ys, xs = torch.nonzero(changed, as_tuple=True)
    r = model.kernel_size // 2
    assert len(ys) > 0 and (ys - 20).abs().max() <= r and (xs - 30).abs().max() <= r
    # border alignment: per row of the road/sky image, the strongest horizontal-free vertical step is
    # at the label's border in the source and in the translation
    img = torch.stack([it["image"] for it in scenes(1, noise=0.0)])
    lab = scenes(1)[0]["label"]
    out = model(img)
    col = img.shape[-1] - 2  # a column with no building
    step_src = (img[0, :, 1:, col] - img[0, :, :-1, col]).abs().sum(0).argmax()
    step_out = (out[0, :, 1:, col] - out[0, :, :-1, col]).abs().sum(0).argmax()
    border = int(torch.nonzero(lab[1:, col] != lab[:-1, col])[0])
    assert int(step_src) == border == int(step_out)


def test_noise_map_is_fixed_across_calls_and_seeded():
    torch.manual_seed(123)
    a = make_model(noise_seed=5)
    torch.manual_seed(456)
    b = make_model(noise_seed=5)
    c = make_model(noise_seed=6)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    with torch.no_grad():
        a.predictor.head.bias[9:] = 0.1     # noise scale on
    x = torch.stack([it["image"] for it in scenes(2)])
    y1, y2 = a(x), a(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, x)
    assert "noise" in a.state_dict() and "noise" in a.trainable_state_dict()


def test_grad_reverse_flips_gradients():
    x = torch.randn(5, requires_grad=True)
    (ops.grad_reverse(x, 0.5) * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(5.0))
    y = torch.randn(5)
    assert torch.equal(ops.grad_reverse(y), y)


def test_parameter_maps_are_twelve_full_res_maps():
    model = _random_head(make_model())
    x = torch.stack([it["image"] for it in scenes(2)])
    maps = kpn.parameter_maps(model, x)
    assert list(maps) == list(kpn.PARAM_NAMES)
    assert all(m.shape == (2, H, W) for m in maps.values())
    assert maps["gain_h"].std() > 0


# ---------------------------------------------------------------------------------- training
def test_one_step_trains_the_kpn_not_the_segmenter(tmp_path):
    torch.manual_seed(0)
    segm = TinySeg()
    before = {k: v.clone() for k, v in segm.state_dict().items()}
    model, hist = kpn.train_kpn(segm, scenes(8), scenes(8, shift=0.3, noise=0.1, seed=1), small_cfg(iters=1),
                                device="cpu")
    assert len(hist) == 1 and np.isfinite(hist["loss"]).all()
    assert model.predictor.head.weight.abs().sum() > 0, "one step must move the KPN weights"
    for k, v in segm.state_dict().items():
        assert torch.equal(v, before[k]), f"frozen segmenter changed: {k}"
    for col in ("mse", "d_fake_patch", "d_real_patch", "d_fake_whole", "d_real_whole"):
        assert col in hist


def test_checkpoint_resume_is_exact(tmp_path):
    src, tgt = scenes(8), scenes(8, shift=0.3, noise=0.1, seed=1)
    torch.manual_seed(0)
    segm = TinySeg()
    full, h_full = kpn.train_kpn(segm, src, tgt, small_cfg(iters=4, ckpt_every=2), out_dir=tmp_path / "a", device="cpu")
    # drop the final checkpoint: the run resumes from step 2 (as after an interruption)
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_0000004")
    resumed, h_res = kpn.train_kpn(segm, src, tgt, small_cfg(iters=4, ckpt_every=2), out_dir=tmp_path / "a",
                                   device="cpu")
    torch.testing.assert_close(resumed.predictor.state_dict(), full.predictor.state_dict(), rtol=0, atol=0)
    assert list(h_res["iter"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(h_res["loss"], h_full["loss"])
    # a finished run is loaded, not retrained; the saved model round-trips
    again, _ = kpn.train_kpn(segm, src, tgt, small_cfg(iters=4, ckpt_every=2), out_dir=tmp_path / "a", device="cpu")
    torch.testing.assert_close(again.predictor.state_dict(), full.predictor.state_dict(), rtol=0, atol=0)
    loaded = kpn.load_kpn(tmp_path / "a", segm, device="cpu")
    x = torch.stack([it["image"] for it in src[:2]])
    torch.testing.assert_close(loaded(x), full(x))
    # another config in the same folder is refused, not silently continued
    with pytest.raises(ValueError, match="another training config"):
        kpn.train_kpn(segm, src, tgt, small_cfg(iters=6, lr=5e-3), out_dir=tmp_path / "a", device="cpu")
    assert (tmp_path / "a" / "history.csv").is_file()


def test_translate_dataset_writes_a_gta5_set(tmp_path):
    datasets = pytest.importorskip("dasslab.datasets")
    model = _random_head(make_model())
    src = scenes(5)
    meta = kpn.translate_dataset(model, src, tmp_path / "kpn", batch_size=2, device="cpu", params={"x": 1})
    assert meta["n_images"] == 5 and meta["seconds_per_image"] > 0 and meta["method"] == "kpn"
    assert (tmp_path / "kpn" / "translation.json").is_file()
    ds = datasets.SegFolder(tmp_path / "kpn", preset="gta5")
    assert len(ds) == 5 and sorted(ds.names) == [it["name"] for it in src]
    item = ds[ds.names.index("scene_002")]
    assert torch.equal(item["label"], src[2]["label"])
    ref = model(src[2]["image"][None])[0]
    assert (item["image"] - ref).abs().max() <= 1.0 / 127.5 + 1e-6   # uint8 quantisation only
    assert common.translation_is_current(tmp_path / "kpn", {"x": 1, "model": model.config}, 5)
    assert not common.translation_is_current(tmp_path / "kpn", {"x": 2, "model": model.config}, 5)


# ---------------------------------------------------------------------------------- analysis
def test_influence_map_is_local_for_the_kpn_and_wide_for_a_generator():
    from dasslab import cyclegan

    model = _random_head(make_model())
    with torch.no_grad():
        model.predictor.head.bias[6:9] = 1.5          # blur on: the widest a KPN can reach
    x = scenes(1, noise=0.1)[0]["image"]
    infl = kpn.influence_map(model, x, (16, 30))
    r = model.kernel_size // 2
    assert infl[16, 30] > 0 and kpn.influence_radius(infl, (16, 30)) <= r
    torch.manual_seed(0)
    g = cyclegan.ResnetGenerator(ngf=4, n_blocks=2, n_down=2)
    infl_g = kpn.influence_map(g, x, (16, 30))
    assert kpn.influence_radius(infl_g, (16, 30)) > 3 * r
    with pytest.raises(ValueError, match="outside"):
        kpn.influence_map(model, x, (40, 0))


def test_parameters_by_class_reads_per_class_means():
    model = _random_head(make_model())
    items = scenes(3)
    df = kpn.parameters_by_class(model, items, batch_size=2)
    assert set(df.index) == {"road", "building", "sky"}
    x = torch.stack([it["image"] for it in items])
    lab = torch.stack([it["label"] for it in items])
    p = model.params(x).detach()
    road = p.permute(0, 2, 3, 1)[lab == 0].mean(0).double().numpy()
    np.testing.assert_allclose(df.loc["road", list(kpn.PARAM_NAMES)].to_numpy(float), road, rtol=1e-5)
    assert df.loc["road", "pixels"] == int((lab == 0).sum())
    assert df.loc["sky", "gain_h"] != df.loc["road", "gain_h"]


# ---------------------------------------------------------------------------------- from a profile
class ListSet(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("profile", ["tiny", "demo", "paper-gta2cs", "paper-cs2acdc"])
def test_every_profile_gives_valid_configs(profile):
    from dasslab import cyclegan, runs

    cfg = runs.load_config(profile, notebook="05_kpn_baseline")
    kc, cc = kpn.kpn_config(cfg), cyclegan.cyclegan_config(cfg)
    assert kc.iters == cfg.nb.kpn_iters and cc.iters == cfg.nb.cyclegan_iters
    size = tuple(cfg.data.size)
    kc = kc.resolved(size)
    need = kpn.PatchGAN(n_layers=kc.n_layers).min_size()
    assert min(kc.lowres) >= need and min(kc.patch) >= need
    assert kc.patch[0] <= size[0] and kc.patch[1] <= size[1]


def test_cli_registers_both_commands():
    from dasslab import cli

    text = cli.build_parser().format_help()
    assert "kpn-train" in text and "cyclegan-train" in text


def test_run_from_profile_trains_translates_and_reuses(tmp_path):
    from dasslab import cyclegan, runs

    cfg = runs.load_config("tiny", notebook="05_kpn_baseline", run_dir=tmp_path / "run", device="cpu")
    cfg.seg.update(iters=2, batch_size=4, ckpt_every=0, seeds=[0])
    cfg.nb.update(kpn_iters=2, cyclegan_iters=2, cyclegan_ngf=4)
    sets = {"source_train": ListSet(scenes(6)), "target_train": ListSet(scenes(6, shift=0.3, noise=0.1, seed=1))}
    rd = runs.RunDir(cfg.run_dir)
    res = kpn.run(cfg, rd, sets)
    out = rd.translated("kpn")
    assert res["translation"]["n_images"] == 6 and len(list((out / "images").glob("*.png"))) == 6
    stamp = (out / "translation.json").stat().st_mtime_ns
    again = kpn.run(cfg, rd, sets)                  # finished: loaded, and the set is not rewritten
    assert (out / "translation.json").stat().st_mtime_ns == stamp and len(again["history"]) == 2
    torch.testing.assert_close(again["model"].predictor.state_dict(), res["model"].predictor.state_dict())
    cfg.nb.kpn_hidden = 4                            # other settings: old checkpoints are dropped, not an error
    other = kpn.run(cfg, rd, sets)
    assert other["model"].predictor.hidden == 4 and len(other["history"]) == 2
    assert (out / "translation.json").stat().st_mtime_ns != stamp
    res_c = cyclegan.run(cfg, rd, sets)
    assert res_c["translation"]["n_images"] == 6 and (rd.translated("cyclegan") / "translation.json").is_file()


def test_translate_with_switches_operation_groups():
    model = _random_head(make_model())
    with torch.no_grad():
        model.predictor.head.bias[6:] = 0.5          # blur and noise on
    x = torch.stack([it["image"] for it in scenes(3, noise=0.1)])
    torch.testing.assert_close(kpn.translate_with(model, x, keep=()), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(kpn.translate_with(model, x, batch_size=2), model(x).detach())
    only_colour = kpn.translate_with(model, x, keep=("colour",))
    p = model.params(x).detach()
    p[:, 6:] = torch.tensor(ops.IDENTITY[6:]).view(1, 6, 1, 1)
    torch.testing.assert_close(only_colour, ops.apply_translation((x + 1) / 2, p, model.noise, 5) * 2 - 1)
    with pytest.raises(ValueError, match="unknown group"):
        kpn.translate_with(model, x, keep=("texture",))
