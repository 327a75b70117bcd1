"""Semantic gradient guidance on tiny random models (UNet 16x32, a 2-layer conv segmenter)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dasslab.diffusion import sampling, sgg

H, W, C = 16, 32, 19


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return (
        UNet2DModel(
            sample_size=(H, W),
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )
        .eval()
        .requires_grad_(False)
    )


def tiny_scheduler(kind="ddpm", clip=True):
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(num_train_timesteps=40, clip_sample=clip)


class TinySeg(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def blocky_labels(B=2):
    y = torch.full((B, H, W), 255, dtype=torch.long)
    y[:, :6] = 10  # sky
    y[:, 6:12, :16] = 2  # building
    y[:, 6:12, 16:] = 8  # vegetation
    y[:, 12:] = 0  # road
    y[1, 12:, 20:] = 13  # a car in image 1 only
    y[:, 0, :4] = 255  # a few ignored pixels
    return y


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny_unet(), TinySeg()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, H, W, generator=g) * 2 - 1, blocky_labels()


def gen(seed=7):
    return sampling.generators([seed, seed + 1])


# ----------------------------------------------------------------------------------- settings
def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        sgg.SGGConfig(schedule="zigzag")
    with pytest.raises(ValueError, match="strength"):
        sgg.SGGConfig(strength=1.5)
    with pytest.raises(ValueError, match="guide_input"):
        sgg.SGGConfig(guide_input="clean")
    with pytest.raises(ValueError, match="lambda"):
        sgg.SGGConfig(lambda_gsg=-1)
    with pytest.raises(ValueError, match="eta"):
        sgg.SGGConfig(sampler="ddpm", eta=0.5)
    assert [sgg.step_kind("alternate", i) for i in range(4)] == ["lcg", "gsg", "lcg", "gsg"]
    cfg = sgg.config_from_table({"strength": 0.4, "guide_iters": 10}, lambda_lcg=3.0, schedule=None)
    assert cfg.strength == 0.4 and cfg.lambda_lcg == 3.0 and cfg.schedule == "alternate"


def test_class_pairs_and_weights():
    y = blocky_labels()
    b, c, m = sgg.class_pairs(y, C)
    assert b.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert c.tolist() == [0, 2, 8, 10, 0, 2, 8, 10, 13]
    # masks are disjoint and cover exactly the labelled pixels
    cover = torch.zeros(2, H, W).index_add_(0, b, m)
    assert torch.equal(cover, (y != 255).float())
    w = sgg.pixel_weights(y, C)
    for i in range(2):
        totals = [float(w[i][y[i] == k].sum()) for k in c[b == i].tolist()]
        assert max(totals) == pytest.approx(min(totals), rel=1e-5)
        assert float(w[i].sum()) == pytest.approx(float((y[i] != 255).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        sgg.class_pairs(torch.full((1, 2, 2), 40), C)


# ----------------------------------------------------------------------------------- SDEdit equality
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_zero_scale_is_sdedit_bit_for_bit(models, batch, kind):
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler(kind)
    base = {
        "strength": 0.5,
        "sampler": kind,
        "eta": 0.3 if kind == "ddim" else 0.0,
        "num_steps": 10 if kind == "ddim" else None,
    }
    # SDEdit through the shared loop, no hook
    ts = sampling.sdedit_timesteps(sched, 0.5, base["num_steps"])
    g = gen()  # one stream: the noise to x_K first, then the reverse chain
    ref = (
        sampling.reverse_diffusion(
            unet, sched, sampling.noise_to(sched, x, ts[0], g), ts, generator=g, eta=base["eta"]
        )
        .float()
        .clamp(-1, 1)
    )
    for sch in ("alternate", "both", "lcg"):
        out, hook = sgg.sgg_translate(
            unet,
            sched,
            x,
            y,
            guide,
            sgg.SGGConfig(schedule=sch, lambda_lcg=0.0, lambda_gsg=0.0, **base),
            generator=gen(),
            return_hook=True,
        )
        assert hook is None and torch.equal(out, ref)
    # a hook that runs but is asked for scale 0 on the active kind leaves the chain untouched
    out, hook = sgg.sgg_translate(
        unet,
        sched,
        x,
        y,
        guide,
        sgg.SGGConfig(schedule="gsg", lambda_lcg=5.0, lambda_gsg=0.0, **base),
        generator=gen(),
        return_hook=True,
    )
    assert len(hook.history) == len(ts) and torch.equal(out, ref)
    # guide=None is SDEdit too; and a live scale changes the result
    assert torch.equal(
        sgg.sgg_translate(unet, sched, x, y, None, sgg.SGGConfig(**base), generator=gen()), ref
    )
    live = sgg.sgg_translate(
        unet, sched, x, y, guide, sgg.SGGConfig(lambda_lcg=2.0, lambda_gsg=2.0, **base), generator=gen()
    )
    assert not torch.equal(live, ref)


def test_matches_sdedit_module(models, batch):
    """SGG at scale 0 reproduces the SDEdit translator of notebook 01 (same seed), when it exists."""
    sdedit = pytest.importorskip("dasslab.diffusion.sdedit")
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler()
    ref = sdedit.sdedit(unet, sched, x, 0.5, generator=gen())
    out = sgg.sgg_translate(
        unet, sched, x, y, guide, sgg.SGGConfig(strength=0.5, lambda_lcg=0, lambda_gsg=0), generator=gen()
    )
    assert torch.equal(out, ref.float().clamp(-1, 1).cpu())


# ----------------------------------------------------------------------------------- LCG
def _per_class_loop(guide, x, y):
    """Reference LCG: one (image, class) at a time, each its own forward/backward."""
    grads = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for c in sorted(set(y[b].unique().tolist()) - {255}):
            m = (y[b] == c).float()
            xb = x[b : b + 1].clone().requires_grad_(True)
            target = torch.where(m > 0, y[b], torch.full_like(y[b], 255))[None]
            ce = F.cross_entropy(guide(xb * m), target, ignore_index=255, reduction="sum")
            g = torch.autograd.grad(ce, xb)[0][0]
            assert float(g[:, m == 0].abs().max()) == 0.0  # masked input: no pull outside m_c
            grads[b] += m * g
    return grads


def test_lcg_batching_equals_per_class_loop(models, batch):
    _, guide = models
    x, y = batch
    grad, loss, g_pairs, pairs = sgg.guidance_gradient(guide, x, y, "lcg", per_class=True)
    ref = _per_class_loop(guide, x, y)
    assert torch.allclose(grad, ref, atol=1e-5, rtol=1e-4)
    assert g_pairs.shape[0] == len(pairs[0]) == 9
    assert float(grad[(y == 255)[:, None].expand_as(grad)].abs().max()) == 0.0
    # the per-class losses sum to the per-image LCG loss
    per_pair, _, _ = sgg.lcg_loss(guide, x, y)
    assert torch.allclose(torch.zeros(2).index_add_(0, pairs[0], per_pair.detach()), loss)


def first_step(unet, sched, xt, ts, hook):
    """x_{k-1} after one guided reverse step from x_k (read at the start of the next step)."""
    out = {}

    def wrapper(state):
        if state.index == 0:
            return hook(state) if hook is not None else None
        out["x"] = state.x_t.detach().clone()
        out["x0"] = state.x0_hat.detach().clone()
        return None

    sampling.reverse_diffusion(unet, sched, xt, ts[:2], generator=gen(), guidance=wrapper)
    return out


def test_lcg_merge_takes_each_pixel_from_its_class_branch(models, batch):
    """One reverse step: the LCG sample equals sum_c m_c x_{k-1,c} of separate per-class samples,
    each x_{k-1,c} ~ N(mu - lambda Sigma grad_c, Sigma) with the same noise draw."""
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler()
    lam, ts = 300.0, [12, 11]
    xt = sampling.noise_to(sched, x, ts[0], gen(1))
    cfg = sgg.SGGConfig(strength=0.5, schedule="lcg", lambda_lcg=lam, guide_input="noisy")
    merged = first_step(unet, sched, xt, ts, sgg.SGGGuidance(guide, y, cfg))["x"]
    unguided = first_step(unet, sched, xt, ts, None)["x"]
    b_idx, c_idx, masks = sgg.class_pairs(y, C)
    expect = unguided * (y == 255)[:, None]
    for b, c, m in zip(b_idx.tolist(), c_idx.tolist(), masks):

        def branch(state, b=b, c=c):
            xb = state.x_t.detach()[b : b + 1].clone().requires_grad_(True)
            mm = (y[b] == c).float()
            with torch.enable_grad():
                ce = F.cross_entropy(
                    guide(xb * mm), torch.where(mm > 0, y[b], 255)[None], ignore_index=255, reduction="sum"
                )
                g = torch.autograd.grad(ce, xb)[0]
            full = torch.zeros_like(state.x_t)
            full[b] = g[0]
            return state.shift(full, lam)

        xc = first_step(unet, sched, xt, ts, branch)["x"]
        expect[b] += m * xc[b]
    assert torch.allclose(merged, expect, atol=1e-5)
    assert float((merged - unguided).abs().max()) > 1e-2


# ----------------------------------------------------------------------------------- the pull works
def _ce(guide, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(guide(x), y, ignore_index=255))


@pytest.mark.parametrize(
    "kind,guide_input,sampler",
    [("gsg", "noisy", "ddpm"), ("lcg", "noisy", "ddpm"), ("gsg", "x0", "ddim"), ("lcg", "x0", "ddpm")],
)
def test_guidance_lowers_next_step_loss(models, batch, kind, guide_input, sampler):
    unet, guide = models
    x, y = batch
    # no x0 clipping here: a random UNet's x0 estimate saturates at +-1, where clipping hides any pull
    sched = sgg.scheduler_for(tiny_scheduler(clip=False), sampler)
    ts = [20, 19]
    xt = sampling.noise_to(sched, x, ts[0], gen(2))
    cfg = sgg.SGGConfig(
        strength=0.5, schedule=kind, lambda_lcg=4.0, lambda_gsg=4.0, guide_input=guide_input, sampler=sampler
    )
    # the loss of the guide on the next step's input x_{k-1} (or its clean estimate in the x0 mode)
    key = "x" if guide_input == "noisy" else "x0"

    def x_prev(guided):
        return first_step(unet, sched, xt, ts, sgg.SGGGuidance(guide, y, cfg) if guided else None)[key]

    assert _ce(guide, x_prev(True), y) < _ce(guide, x_prev(False), y)


def test_guided_chain_ends_closer_to_the_label(models, batch):
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler()
    cfg = sgg.SGGConfig(strength=0.6, lambda_lcg=3.0, lambda_gsg=3.0, guide_input="x0")
    sd = sgg.sgg_translate(unet, sched, x, y, None, cfg, generator=gen())
    out, hook = sgg.sgg_translate(unet, sched, x, y, guide, cfg, generator=gen(), return_hook=True)
    assert _ce(guide, out, y) < _ce(guide, sd, y)
    kinds = [h["kind"] for h in hook.history]
    assert kinds[:4] == ["lcg", "gsg", "lcg", "gsg"]
    assert all(h.get("lcg_grad", h.get("gsg_grad", 0)) > 0 for h in hook.history)


def test_x0_through_unet_and_options(models, batch):
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler()
    base = sgg.SGGConfig(strength=0.3, lambda_lcg=2.0, lambda_gsg=2.0, guide_input="x0")
    outs = {}
    for name, cfg in {
        "identity": base,
        "unet": base.replace(x0_grad="unet"),
        "clip": base.replace(grad_clip=1e-3),
        "weighted": base.replace(class_weighting=True),
        "both": base.replace(schedule="both"),
    }.items():
        outs[name] = sgg.sgg_translate(unet, sched, x, y, guide, cfg, generator=gen())
        assert outs[name].shape == x.shape and torch.isfinite(outs[name]).all()
    sd = sgg.sgg_translate(unet, sched, x, y, None, base, generator=gen())
    for name, out in outs.items():
        assert not torch.equal(out, sd), name
    # clipping to a tiny bound keeps the result near SDEdit
    assert (outs["clip"] - sd).abs().max() < (outs["identity"] - sd).abs().max()


def test_per_image_seeding_is_batch_independent(models, batch):
    unet, guide = models
    x, y = batch
    sched = tiny_scheduler()
    cfg = sgg.SGGConfig(strength=0.4, lambda_lcg=2.0, lambda_gsg=2.0)
    both = sgg.sgg_translate(unet, sched, x, y, guide, cfg, generator=gen())
    one = sgg.sgg_translate(unet, sched, x[1:], y[1:], guide, cfg, generator=gen()[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


# ----------------------------------------------------------------------------------- datasets and guides
class ListSet(torch.utils.data.Dataset):
    def __init__(self, n=5):
        g = torch.Generator().manual_seed(0)
        self.items = [
            {
                "image": torch.rand(3, H, W, generator=g) * 2 - 1,
                "label": blocky_labels(2)[i % 2],
                "name": f"img{i:02d}",
            }
            for i in range(n)
        ]
        self.names = [it["name"] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_translate_dataset_writes_layout_and_resumes(models, tmp_path):
    from dasslab import datasets

    unet, guide = models
    sched = tiny_scheduler()
    ds = ListSet(5)
    cfg = sgg.SGGConfig(strength=0.3, lambda_lcg=2.0, lambda_gsg=2.0)
    out = tmp_path / "sgg"
    rec = sgg.translate_dataset_sgg(unet, sched, guide, ds, out, cfg, batch_size=2, progress=False)
    assert rec == json.loads((out / "translation.json").read_text())
    assert rec["n_images"] == 5 and rec["seconds_per_image"] > 0 and rec["method"] == "sgg"
    assert rec["params"]["sgg"]["lambda_lcg"] == 2.0 and rec["params"]["guided"] is True
    back = datasets.SegFolder(out, "gta5")
    assert back.names == ds.names
    for i in range(5):
        assert torch.equal(back[i]["label"], ds[i]["label"])
    # batch size does not change the images (per-name seeds)
    sgg.translate_dataset_sgg(unet, sched, guide, ds, tmp_path / "sgg3", cfg, batch_size=3, progress=False)
    a, b = datasets.SegFolder(out, "gta5"), datasets.SegFolder(tmp_path / "sgg3", "gta5")
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(5))
    # an interrupted run resumes: remove one image, the others are not rewritten
    (out / "images" / "img03.png").unlink()
    stamp = (out / "images" / "img01.png").stat().st_mtime_ns
    sgg.translate_dataset_sgg(unet, sched, guide, ds, out, cfg, batch_size=2, progress=False)
    assert (out / "images" / "img03.png").is_file()
    assert (out / "images" / "img01.png").stat().st_mtime_ns == stamp
    assert torch.equal(datasets.SegFolder(out, "gta5")[3]["image"], b[3]["image"])
    # other settings replace the set; a foreign folder is never overwritten
    sgg.translate_dataset_sgg(unet, sched, guide, ds, out, cfg.replace(strength=0.2), limit=2, progress=False)
    assert len(datasets.SegFolder(out, "gta5")) == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="foreign"):
        sgg.translate_dataset_sgg(unet, sched, guide, ds, tmp_path / "foreign", cfg, progress=False)


def test_noisy_ce_trains_through_the_seg_loop(tmp_path):
    from dasslab import seg

    sched = tiny_scheduler()
    fn = sgg.NoisyCE(sched.alphas_cumprod, t_max=20, p_clean=0.0)
    x = torch.zeros(4, 3, H, W)
    torch.manual_seed(0)
    noisy = fn.noise(x)
    assert noisy.shape == x.shape and float(noisy.abs().mean()) > 0
    assert torch.equal(sgg.NoisyCE(sched.alphas_cumprod, 20, p_clean=1.0).noise(x), x)
    with pytest.raises(ValueError, match="t_max"):
        sgg.NoisyCE(sched.alphas_cumprod, t_max=40)
    model = seg.build_segmenter("unet-small", 19, width=4, depth=2)
    tc = seg.TrainConfig(iters=3, batch_size=2, amp=False)
    model, hist = seg.train_segmenter(model, ListSet(4), tc, device="cpu", loss_fn=fn)
    assert len(hist) == 3 and hist["loss"].notna().all()
    _, extra = sgg.guide_loss("noisy", sched, 20)
    assert extra["t_max"] == 20 and extra["guide_input"] == "noisy"
    with pytest.raises(ValueError, match="scheduler"):
        sgg.guide_loss("noisy")


def test_cli_registers():
    from dasslab import cli

    parser = cli.build_parser()
    args = parser.parse_args(["sgg", "--run-dir", "x", "--strength", "0.5", "--schedule", "gsg"])
    assert args.func is sgg._cmd_sgg and args.strength == 0.5 and args.schedule == "gsg"


def test_translate_subset_matches_dataset_translation_and_caches(models, tmp_path, monkeypatch):
    from dasslab import datasets

    unet, guide = models
    sched = tiny_scheduler()
    ds = ListSet(5)
    cfg = sgg.SGGConfig(strength=0.3, lambda_lcg=2.0, lambda_gsg=2.0)
    res = sgg.translate_subset(unet, sched, ds, guide, cfg, n=3, batch_size=2, cache_dir=tmp_path / "cache")
    assert res["images"].shape == (3, 3, H, W) and res["names"] == ds.names[:3]
    assert [h["kind"] for h in res["history"][:3]] == ["lcg", "gsg", "lcg"]
    sgg.translate_dataset_sgg(unet, sched, guide, ds, tmp_path / "set", cfg, limit=3, progress=False)
    disk = datasets.SegFolder(tmp_path / "set", "gta5")
    for i in range(3):  # same seeds in memory and on disk (up to PNG quantisation)
        assert (disk[i]["image"] - res["images"][i]).abs().max() <= 1.0 / 127.5 + 1e-6
    monkeypatch.setattr(
        sgg, "sgg_translate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    )
    again = sgg.translate_subset(unet, sched, ds, guide, cfg, n=3, batch_size=2, cache_dir=tmp_path / "cache")
    assert torch.equal(again["images"], res["images"])


def test_scores_and_snapshots(models, batch):
    unet, guide = models
    x, y = batch
    sc = sgg.translation_scores(
        x, y, ref=TinySeg(1), guide=guide, target_images=torch.rand(4, 3, H, W) * 2 - 1
    )
    assert set(sc) == {"label_consistency", "kid", "guide_ce", "guide_miou"}
    assert 0 <= sc["label_consistency"] <= 100 and sc["guide_ce"] > 0
    cfg = sgg.SGGConfig(strength=0.3, lambda_lcg=1.0, lambda_gsg=1.0)
    snaps = sgg.chain_snapshots(unet, tiny_scheduler(), x, y, guide, cfg, generator=gen(), every=4)
    n = len(sampling.sdedit_timesteps(tiny_scheduler(), 0.3))
    assert [s["index"] for s in snaps] == sorted({*range(0, n, 4), n - 1})
    assert snaps[0]["x0_hat"].shape == x.shape and snaps[0]["kind"] == "lcg"


def test_miou_under_noise(models):
    _, guide = models
    rows = sgg.miou_under_noise(guide, ListSet(4), tiny_scheduler(), [0.0, 0.5], n=3)
    assert [r["strength"] for r in rows] == [0.0, 0.5] and rows[0]["t"] == -1 and rows[1]["t"] == 19
    assert all(0 <= r["mIoU"] <= 100 for r in rows)


def test_compare_table(models, tmp_path):
    unet, guide = models
    base = sgg.SGGConfig(strength=0.3, lambda_lcg=2.0, lambda_gsg=2.0)
    table, outs = sgg.compare(
        unet,
        tiny_scheduler(),
        ListSet(3),
        {"sdedit": (base, None), "gsg": (base.replace(schedule="gsg"), guide)},
        n=2,
        ref=TinySeg(1),
        cache_dir=tmp_path,
        progress=False,
    )
    assert table["name"].tolist() == ["sdedit", "gsg"] and table["schedule"].tolist() == ["none", "gsg"]
    assert (
        table.loc[0, "lambda_lcg"] == 0.0
        and "label_consistency" in table
        and outs["gsg"]["images"].shape[0] == 2
    )
    assert not torch.equal(outs["sdedit"]["images"], outs["gsg"]["images"])
    assert pd_isnan(table.loc[0, "guide_ce"]) and not pd_isnan(table.loc[1, "guide_ce"])
    scored, _ = sgg.compare(unet, tiny_scheduler(), ListSet(3), {"sdedit": (base, None)}, n=2, cache_dir=tmp_path,
                            score_guide=guide, progress=False)
    assert scored.loc[0, "guide_ce"] > 0  # the SDEdit row read by the guide too (from the cache)


def pd_isnan(v):
    import math

    return v is None or (isinstance(v, float) and math.isnan(v))


def test_x0_jacobian():
    a = torch.tensor([1.0, 0.5, 0.01])
    ident, gauss = sgg.x0_jacobian(a, "identity"), sgg.x0_jacobian(a, "gaussian", 0.25)
    assert float(ident[0]) == pytest.approx(1.0) and float(gauss[0]) == pytest.approx(1.0)
    assert bool((gauss[1:] < ident[1:]).all()) and float(gauss[2]) < 0.05 < 5 < float(ident[2])
    with pytest.raises(ValueError, match="kind"):
        sgg.x0_jacobian(a, "unet")
    with pytest.raises(ValueError, match="x0_prior_var"):
        sgg.SGGConfig(x0_prior_var=0)


def test_blur_gradient_is_a_low_pass():
    const = torch.full((2, 3, 8, 12), 0.7)
    assert torch.allclose(sgg.blur_gradient(const, 1.5), const, atol=1e-6)  # mean kept, edges too
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float().expand(1, 3, 8, 12)
    out = sgg.blur_gradient(checker, 1.5)
    assert out.shape == checker.shape and out.abs().max() < 0.1 * checker.abs().max()
    tiny = torch.randn(1, 1, 2, 3)  # images smaller than the kernel still work
    assert sgg.blur_gradient(tiny, 3.0).shape == tiny.shape
    with pytest.raises(ValueError, match="grad_blur"):
        sgg.SGGConfig(grad_blur=-1.0)


def test_grad_blur_changes_the_guided_sample_only_when_on(models, batch):
    unet, guide = models
    sched = tiny_scheduler("ddim")
    x, y = batch
    base = sgg.SGGConfig(strength=0.5, lambda_lcg=1.0, lambda_gsg=1.0, sampler="ddim", num_steps=6)
    run = lambda c: sgg.sgg_translate(unet, sched, x, y, guide, c, generator=sampling.generators(range(len(x))))
    a, b = run(base), run(base.replace(grad_blur=1.0))
    assert not torch.allclose(a, b)
    assert torch.equal(run(base.replace(grad_blur=0.0)), a)


def test_pgd_perturb_stays_in_the_ball_and_raises_the_loss():
    model = TinySeg(3)
    x = torch.rand(2, 3, H, W) * 1.6 - 0.8
    y = blocky_labels(2)
    torch.manual_seed(0)
    adv = sgg.pgd_perturb(model.train(), x, y, eps=0.1, steps=3)
    assert model.training, "pgd_perturb must restore the train/eval mode"
    assert not adv.requires_grad and adv.shape == x.shape
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.abs().max()) <= 1.0

    def ce(z):
        with torch.no_grad():
            return float(F.cross_entropy(model(z), y, ignore_index=255))

    assert ce(adv) > ce(x) + 1e-4, "the attack must raise the guide's CE"
    with pytest.raises(ValueError, match="eps"):
        sgg.pgd_perturb(model, x, y, eps=0.0)


def test_adversarial_guide_loss_is_fingerprinted_and_trains():
    from dasslab import seg

    plain, robust = sgg.GuideLoss(photometric=1.0), sgg.GuideLoss(photometric=1.0, adv_eps=0.3, adv_steps=2)
    assert "adv_eps" not in plain.identity()  # guides cached before the option keep their fingerprint
    assert robust.identity()["adv_eps"] == 0.3 and robust.identity()["adv_steps"] == 2
    with pytest.raises(ValueError, match="guide_adv_eps"):
        sgg.GuideLoss(adv_eps=-0.1)
    # the CE is taken on the attacked batch: higher than on the clean one for the same model
    model = seg.build_segmenter("unet-small", 19, width=4, depth=2)
    batch = {"image": torch.rand(2, 3, H, W) * 2 - 1, "label": blocky_labels(2)}
    torch.manual_seed(0)
    l_plain, _ = sgg.GuideLoss()(model, batch)
    torch.manual_seed(0)
    l_adv, _ = sgg.GuideLoss(adv_eps=0.3)(model, batch)
    assert float(l_adv) > float(l_plain)
    model, hist = seg.train_segmenter(
        model, ListSet(4), seg.TrainConfig(iters=2, batch_size=2, amp=False), device="cpu", loss_fn=robust
    )
    assert len(hist) == 2 and hist["loss"].notna().all()
    # the table keys reach guide_loss; absent keys mean off
    kw = sgg.guide_training({"guide_photometric": 1.0, "guide_adv_eps": 0.3})
    assert kw == {"photometric": 1.0, "adv_eps": 0.3, "adv_steps": 3}
    fn, extra = sgg.guide_loss("x0", **kw)
    assert isinstance(fn, sgg.GuideLoss) and extra["adv_eps"] == 0.3 and extra["guide_input"] == "x0"
    assert sgg.guide_loss("x0", **sgg.guide_training({})) == (None, {"guide_input": "x0"})
    _, extra = sgg.guide_loss("noisy", tiny_scheduler(), 20, **kw)  # the library trains any guide robustly
    assert extra["t_max"] == 20 and extra["adv_eps"] == 0.3
    # a profile's radius goes to the clean guide; the noise-aware one is smoothed by its noise instead
    assert sgg.guide_training({"guide_adv_eps": 0.3}, "noisy")["adv_eps"] == 0.0
    with pytest.raises(ValueError, match="guide_input"):
        sgg.guide_training({}, "clean")
