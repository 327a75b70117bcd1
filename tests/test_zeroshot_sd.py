"""sd-controlnet backend end to end on tiny random components saved to disk (nothing from a hub)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dasslab.zeroshot import sd_controlnet as sdc
from dasslab.zeroshot.backends import make_backend

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"


def _tiny_sd(root: Path) -> tuple[Path, Path]:
    """Random tiny SD + ControlNet written as save_pretrained folders (configs as diffusers' tests)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
        attention_head_dim=4)
    controlnet = ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
        conditioning_embedding_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    # A random ControlNet starts with zero-initialised output convs (no effect on the UNet by design);
    # give them weights so the test can see the layout reach the output.
    with torch.no_grad():
        zero_init = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block,
                                                                controlnet.controlnet_cond_embedding.conv_out]
        for mod in zero_init:
            mod.weight.normal_(0, 0.3)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(**sdc.SD15_SCHEDULER)
    sd = root / "sd"
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text), ("tokenizer", tok),
                       ("scheduler", sched)):
        part.save_pretrained(sd / name)
    cn = root / "controlnet_seg"
    controlnet.save_pretrained(cn)
    return sd, cn


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return _tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def backend(tiny_dirs):
    sd, cn = tiny_dirs
    return make_backend("sd-controlnet", model_dir=sd, controlnet_dir=cn, device="cpu",
                        num_inference_steps=4, short_side=16)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    labels = torch.randint(0, 19, (2, 16, 24), generator=g)
    labels[:, :2] = 255
    return images, labels


def test_missing_parts_are_named(tmp_path, tiny_dirs):
    sd, cn = tiny_dirs
    with pytest.raises(FileNotFoundError, match="the Stable Diffusion folder itself"):
        sdc.load_components(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="segmentation ControlNet"):
        sdc.load_components(sd, tmp_path / "no_controlnet")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        sdc.load_components(broken, cn)
    msg = str(err.value)
    for part in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"):
        assert part in msg


def test_transfer_shape_and_range(backend):
    images, labels = _batch()
    out = backend.transfer(images, labels, "driving at night", 0.75, torch.Generator().manual_seed(42))
    assert out.shape == images.shape
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert backend.working_size(16, 24) == (16, 24)
    assert backend.settings()["guidance_scale"] == 9.0  # paper default kept unless overridden


def test_determinism_by_seed(backend):
    images, labels = _batch()
    a = backend.transfer(images, labels, "driving in fog", 0.6, torch.Generator().manual_seed(42))
    b = backend.transfer(images, labels, "driving in fog", 0.6, torch.Generator().manual_seed(42))
    c = backend.transfer(images, labels, "driving in fog", 0.6, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_layout_condition_changes_output(backend):
    images, labels = _batch()
    other = torch.roll(labels, shifts=7, dims=2)
    other[:, 8:] = 0
    a = backend.transfer(images, labels, "driving in snow", 0.65, torch.Generator().manual_seed(42))
    b = backend.transfer(images, other, "driving in snow", 0.65, torch.Generator().manual_seed(42))
    assert (a - b).abs().mean() > 1e-4


def test_strength_zero_returns_reconstruction(backend):
    images, labels = _batch()
    out = backend.transfer(images, labels, "driving at night", 0.0, torch.Generator().manual_seed(0))
    assert out.shape == images.shape  # VAE round trip only: no diffusion step runs
