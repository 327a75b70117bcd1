"""Target DDPM training (dasslab.diffusion.ddpm) and the shared reverse loop (dasslab.diffusion.sampling)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from dasslab import cli
from dasslab.diffusion import ddpm, sampling

H, W = 8, 16


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=(H, W), block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def flat_colours(n=32, seed=0, h=H, w=W):
    """A trivial distribution: flat images of random colours."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return (c * torch.ones(n, 3, h, w)).contiguous()


def tc_small(**kw):
    base = {"size": "tiny", "steps": 6, "batch_size": 4, "lr": 2e-3, "warmup": 2, "num_train_timesteps": 50, "ckpt_every": 3,
                "keep_ckpts": 3}
    base.update(kw)
    return ddpm.DDPMTrainConfig(**base)


def x_start(b=2, seed=1):
    return torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- reverse loop
def test_reverse_diffusion_equals_hand_written_ddpm_loop():
    unet, sch = tiny_unet(), DDPMScheduler(num_train_timesteps=40)
    x = x_start()
    ours = sampling.reverse_diffusion(unet, sch, x, None, generator=torch.Generator().manual_seed(3))
    # Ho et al. (2020) algorithm 2, written out, with x0 clipping (clip_sample=True)
    ac = sch.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    y = x.clone()
    with torch.no_grad():
        for t in range(39, -1, -1):
            eps = unet(y, torch.full((2,), t)).sample
            a_t, a_p = ac[t], ac[t - 1] if t > 0 else torch.tensor(1.0)
            beta = 1 - a_t / a_p
            x0 = ((y - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            mean = a_p.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * y
            y = mean + (((1 - a_p) / (1 - a_t) * beta).sqrt() * torch.randn(y.shape, generator=g) if t > 0 else 0)
    torch.testing.assert_close(ours, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_path_matches_diffusers_step(eta):
    unet = tiny_unet()
    ref = DDIMScheduler(num_train_timesteps=40)
    ref.set_timesteps(8)
    x = x_start()
    g = torch.Generator().manual_seed(5)
    y = x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(unet(y, t).sample, t, y, eta=eta, generator=g).prev_sample
    ours = sampling.reverse_diffusion(unet, DDIMScheduler(num_train_timesteps=40), x, ref.timesteps.tolist(),
                                      generator=torch.Generator().manual_seed(5), eta=eta)
    torch.testing.assert_close(ours, y, atol=1e-5, rtol=1e-5)


def test_skipped_ddpm_chain_matches_diffusers_custom_timesteps():
    unet = tiny_unet()
    ts = [35, 20, 9, 3, 0]
    ref = DDPMScheduler(num_train_timesteps=40)
    ref.set_timesteps(timesteps=ts)
    g, y = torch.Generator().manual_seed(2), x_start()
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(unet(y, t).sample, t, y, generator=g).prev_sample
    ours = sampling.reverse_diffusion(unet, DDPMScheduler(num_train_timesteps=40), x_start(), ts,
                                      generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sched", [DDPMScheduler, DDIMScheduler])
def test_identity_hook_is_bit_identical_and_hook_sees_the_step(sched):
    unet, sch = tiny_unet(), sched(num_train_timesteps=30)
    seen = []

    def hook(state):
        seen.append((state.index, state.t, state.t_prev, state.kind, float(state.variance)))
        assert state.eps.shape == state.x_t.shape == state.mean.shape == state.x0_hat.shape
        return state.mean.clone()

    ts = sampling.chain_timesteps(sch, 20, 5)
    kw = {"eta": 0.5} if sched is DDIMScheduler else {}
    a = sampling.reverse_diffusion(unet, sch, x_start(), ts, generator=torch.Generator().manual_seed(0), **kw)
    b = sampling.reverse_diffusion(unet, sch, x_start(), ts, generator=torch.Generator().manual_seed(0), guidance=hook, **kw)
    assert torch.equal(a, b)
    assert [s[0] for s in seen] == list(range(len(ts)))
    assert [s[1] for s in seen] == ts and seen[-1][2] == -1
    assert seen[0][3] == sampling.scheduler_kind(sch)


@pytest.mark.parametrize("sched", [DDPMScheduler, DDIMScheduler])
def test_shift_moves_the_result_against_the_loss_gradient(sched):
    """Guidance toward a brighter image (loss = -mean) makes the output brighter; a zero scale does not."""
    unet, sch = tiny_unet(), sched(num_train_timesteps=30)

    class Brighter:
        needs_grad = True

        def __init__(self, scale):
            self.scale = scale

        def __call__(self, state):
            loss = -state.x0_hat.sum()
            grad = torch.autograd.grad(loss, state.x_t)[0]
            return state.shift(grad, self.scale)

    ts = sampling.chain_timesteps(sch, 25, 10)
    kw = {"eta": 1.0} if sched is DDIMScheduler else {}
    run = lambda h: sampling.reverse_diffusion(unet, sch, x_start(), ts, generator=torch.Generator().manual_seed(0),
                                               guidance=h, **kw)
    base, zero, guided = run(None), run(Brighter(0.0)), run(Brighter(5.0))
    assert torch.equal(base, zero)
    assert guided.mean() > base.mean() + 0.05


def test_x0_hook_replaces_the_clean_estimate():
    unet, sch = tiny_unet(), DDIMScheduler(num_train_timesteps=30)
    target = torch.full((2, 3, H, W), 0.25)
    out = sampling.reverse_diffusion(unet, sch, x_start(), sampling.chain_timesteps(sch, 29, 6),
                                     x0_hook=lambda s: target)
    torch.testing.assert_close(out, target)   # the last DDIM step returns x0_hat


def test_noise_to_closed_form_and_per_image_generators():
    sch = DDPMScheduler(num_train_timesteps=100)
    x0 = torch.rand(3, 3, H, W) * 2 - 1
    eps = torch.randn(3, 3, H, W)
    a = sch.alphas_cumprod[60]
    torch.testing.assert_close(sampling.noise_to(sch, x0, 60, noise=eps), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(sampling.noise_to(sch, x0, 60, noise=eps), sch.add_noise(x0, eps, torch.tensor([60])))
    full = sampling.randn((3, 3, H, W), sampling.generators([7, 8, 9]))
    part = sampling.randn((1, 3, H, W), sampling.generators([8]))
    assert torch.equal(full[1:2], part)
    with pytest.raises(ValueError, match="timestep"):
        sampling.noise_to(sch, x0, 100)


def test_timestep_helpers_and_errors():
    sch = DDPMScheduler(num_train_timesteps=1000)
    assert sampling.sdedit_timesteps(sch, 0.0) == []
    assert sampling.sdedit_timesteps(sch, 0.5)[:2] == [499, 498] and len(sampling.sdedit_timesteps(sch, 0.5)) == 500
    ts = sampling.sdedit_timesteps(sch, 0.5, 50)
    assert ts[0] == 499 and ts[-1] == 0 and len(ts) == 25
    assert sampling.chain_timesteps(sch, num_steps=4) == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="strength"):
        sampling.sdedit_timesteps(sch, 1.5)
    with pytest.raises(ValueError, match="descending"):
        sampling.reverse_diffusion(tiny_unet(), DDPMScheduler(num_train_timesteps=30), x_start(), [3, 5])
    with pytest.raises(TypeError, match="EulerDiscreteScheduler"):
        from diffusers import EulerDiscreteScheduler
        sampling.reverse_diffusion(tiny_unet(), EulerDiscreteScheduler(), x_start(), [3, 0])
    with pytest.raises(ValueError, match="prediction_type"):
        sampling.reverse_diffusion(tiny_unet(), DDPMScheduler(num_train_timesteps=30, prediction_type="v_prediction"),
                                   x_start(), [3, 0])


def test_sample_shapes_ddim_and_per_image_seeds():
    unet, sch = tiny_unet(), DDPMScheduler(num_train_timesteps=30)
    s = sampling.sample(unet, sch, 3, sampling.generators([1, 2, 3]), ddim_steps=4, batch_size=2)
    assert s.shape == (3, 3, H, W) and s.abs().max() <= 1.0 + 1e-5
    alone = sampling.sample(unet, sch, 1, sampling.generators([3]), ddim_steps=4)
    torch.testing.assert_close(s[2:], alone)
    grid = sampling.image_grid(s, nrow=2)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3


# ---------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_on_a_trivial_distribution(tmp_path):
    data = flat_colours(48)
    tc = tc_small(steps=60, batch_size=8, ckpt_every=1000)
    pipe, hist = ddpm.train_ddpm(data, tc, tmp_path / "ddpm", device="cpu")
    assert list(hist["step"]) == list(range(1, 61))
    assert hist["loss"].tail(15).mean() < 0.6 * hist["loss"].head(10).mean()
    loaded = ddpm.load_ddpm(tmp_path / "ddpm", device="cpu")
    for a, b in zip(pipe.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    meta = ddpm.read_meta(tmp_path / "ddpm")
    assert meta["steps"] == 60 and meta["sample_size"] == [H, W]
    assert len(ddpm.read_history(tmp_path / "ddpm")) == 60


def test_ema_follows_the_warmup_recursion(tmp_path):
    """EMA weights = e_1 = w_1, e_k = d_k e_(k-1) + (1 - d_k) w_k with d_k = min(decay, 1 - k^-power)."""
    tc = tc_small(steps=4, ckpt_every=1, keep_ckpts=10, ema_decay=0.6, ema_power=1.0)
    pipe, _ = ddpm.train_ddpm(flat_colours(16), tc, tmp_path / "ddpm", device="cpu")
    root = ddpm.checkpoint_root(tmp_path / "ddpm")
    (sub,) = [p for p in root.iterdir() if p.is_dir()]
    ckpts = ddpm.list_checkpoints(sub)
    assert [s for s, _ in ckpts] == [1, 2, 3, 4]
    raw = [dict(UNet2DModel.from_pretrained(p / "unet").named_parameters()) for _, p in ckpts]
    names = list(raw[0])
    ema = {n: raw[0][n].detach().clone() for n in names}
    for k in range(2, 5):
        d = min(0.6, 1 - k ** -1.0)
        ema = {n: d * ema[n] + (1 - d) * raw[k - 1][n].detach() for n in names}
    got = dict(pipe.unet.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].detach(), ema[n], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(got[n], raw[-1][n]) for n in names)   # EMA differs from the raw weights


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
    data = flat_colours(16)
    full, hist_full = ddpm.train_ddpm(data, tc_small(steps=6), tmp_path / "a" / "ddpm", device="cpu")
    ddpm.train_ddpm(data, tc_small(steps=3), tmp_path / "b" / "ddpm", device="cpu")
    resumed, hist_res = ddpm.train_ddpm(data, tc_small(steps=6), tmp_path / "b" / "ddpm", device="cpu", resume=True)
    np.testing.assert_allclose(hist_full["loss"], hist_res["loss"], rtol=1e-5)
    for a, b in zip(full.unet.parameters(), resumed.unet.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    root = ddpm.checkpoint_root(tmp_path / "b" / "ddpm")
    (sub,) = [p for p in root.iterdir() if p.is_dir()]
    assert [s for s, _ in ddpm.list_checkpoints(sub)] == [3, 6]
    state = torch.load(sub / "step_0000006" / "state.pt", weights_only=False)
    assert state["step"] == 6 and len(state["history"]) == 6
    with pytest.raises(FileExistsError, match="--resume"):
        ddpm.train_ddpm(data, tc_small(steps=6), tmp_path / "b" / "ddpm", device="cpu", resume=False)


def test_config_and_presets_errors():
    with pytest.raises(ValueError, match="ddpm_size"):
        ddpm.DDPMTrainConfig(size="huge")
    with pytest.raises(ValueError, match="divisible"):
        ddpm.build_unet("demo", (30, 64))
    u = ddpm.build_unet("demo", (32, 64))
    assert tuple(u.config.block_out_channels) == (32, 64, 64) and "AttnDownBlock2D" in u.config.down_block_types
    with pytest.raises(FileNotFoundError, match="01_target_diffusion"):
        ddpm.load_ddpm("/nonexistent/ddpm")


def test_cli_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-ddpm", "--profile", "tiny"])            # --run-dir is required
    assert "--run-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train-ddpm", "--run-dir", str(tmp_path), "--resume", "--overwrite"])
    rc = cli.main(["train-ddpm", "--profile", "nope", "--run-dir", str(tmp_path)])
    assert rc == 2 and "unknown profile" in capsys.readouterr().err
    rc = cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", str(tmp_path), "--steps", "0"])
    assert rc == 2 and "--steps" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- run-level
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from dasslab import toystreets

    root = tmp_path_factory.mktemp("toy") / "toystreets-tiny"
    toystreets.generate(root, size=(32, 64), n_train=24, n_val=8, seed=0,
                        conditions=["night", "fog", "rain", "snow"], progress=False)
    return root


def test_target_ddpm_trains_once_then_loads(toy_root, tmp_path):
    from dasslab import runs

    cfg = runs.load_config("tiny", notebook="01_target_diffusion", run_dir=tmp_path / "run", data_root=toy_root,
                           overrides={"ddpm_steps": 3})
    assert ddpm.resolution(cfg) == (32, 64)
    tc = ddpm.train_config(cfg)
    assert tc.steps == 3 and tc.size == "tiny" and tc.beta_schedule == cfg.nb.ddpm_beta_schedule
    rd = runs.RunDir(cfg.run_dir)
    _, hist = ddpm.target_ddpm(rd, cfg, device="cpu")
    assert len(hist) == 3 and (ddpm.ddpm_dir(rd) / "model_index.json").is_file()
    stamp = (ddpm.ddpm_dir(rd) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    _, hist2 = ddpm.target_ddpm(rd, cfg, device="cpu")        # same settings: loaded, not retrained
    assert (ddpm.ddpm_dir(rd) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert hist2["loss"].tolist() == pytest.approx(hist["loss"].tolist())
    cfg5 = runs.load_config("tiny", notebook="01_target_diffusion", run_dir=tmp_path / "run", data_root=toy_root,
                            overrides={"ddpm_steps": 5})
    _, hist5 = ddpm.target_ddpm(rd, cfg5, device="cpu")            # more steps: continues from step 3
    assert len(hist5) == 5 and hist5["loss"].head(3).tolist() == pytest.approx(hist["loss"].tolist())


def test_cli_trains_resumes_and_refuses_to_mix(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DASSLAB_DATA_ROOT", str(toy_root))
    run = str(tmp_path / "run")
    assert cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", run, "--steps", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "artifacts" / "ddpm" / "model_index.json").is_file()
    assert cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", run, "--steps", "2"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    rc = cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", run, "--steps", "3"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(["train-ddpm", "--profile", "tiny", "--run-dir", run, "--steps", "3", "--resume"]) == 0
    assert ddpm.read_meta(tmp_path / "run" / "artifacts" / "ddpm")["steps"] == 3
