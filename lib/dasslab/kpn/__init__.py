"""DA-KPN (Mata et al., ECCV-W 2024): image translation by a kernel prediction network.

A frozen source segmenter reads a low-res copy of the source image; from its class logits a kernel
prediction network predicts 12 parameters per low-res pixel (HSV gains and offsets, a Gaussian-blur
sigma per channel, a scale on a fixed noise map), which are upsampled and applied to the source image
itself. No pixel moves, so the source labels stay valid for the translated image.

- :mod:`dasslab.kpn.ops`: the translation function (differentiable HSV, spatially varying blur,
  noise) and the gradient-reversal layer;
- :mod:`dasslab.kpn.nets`: ``KernelPredictor``, ``DAKPN``, ``PatchGAN`` (also CycleGAN's);
- :mod:`dasslab.kpn.train`: domain-adversarial training, save / load, translation of a set;
- :mod:`dasslab.kpn.common`: what the CycleGAN baseline shares (checkpoints, batches, writing sets);
- :mod:`dasslab.kpn.analysis`: influence maps (why a KPN cannot move pixels), parameters per class;
- :mod:`dasslab.kpn.pipeline`: from a profile to a translated set, and ``dasslab kpn-train``.
"""
from .analysis import influence_map, influence_radius, parameters_by_class, translate_with
from .nets import DAKPN, KernelPredictor, PatchGAN
from .ops import (
    IDENTITY,
    PARAM_NAMES,
    apply_translation,
    fixed_noise,
    grad_reverse,
    hsv_affine,
    hsv_to_rgb,
    rgb_to_hsv,
    spatial_gaussian_blur,
)
from .pipeline import kpn_config, load, register, run, source_segmenter
from .train import KPNConfig, load_kpn, parameter_maps, read_history, save_kpn, train_kpn, translate_dataset

__all__ = [
    "DAKPN",
    "IDENTITY",
    "PARAM_NAMES",
    "KPNConfig",
    "KernelPredictor",
    "PatchGAN",
    "apply_translation",
    "fixed_noise",
    "grad_reverse",
    "hsv_affine",
    "hsv_to_rgb",
    "influence_map",
    "influence_radius",
    "kpn_config",
    "load",
    "load_kpn",
    "parameter_maps",
    "parameters_by_class",
    "read_history",
    "register",
    "rgb_to_hsv",
    "run",
    "save_kpn",
    "source_segmenter",
    "spatial_gaussian_blur",
    "train_kpn",
    "translate_dataset",
    "translate_with",
]
