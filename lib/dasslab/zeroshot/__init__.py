"""Zero-shot domain adaptation (ZoDi): a prompt names the target, a layout-to-image model transfers the
source images there, and the segmenter adapts on source + transferred pairs.

- :mod:`.backends` -- the ``transfer(images, labels, prompt, strength, generator)`` interface, layouts.
- :mod:`.inversion` -- stochastic inversion + guided DDIM, shared by both backends.
- :mod:`.embedded` -- the offline default generator (pretrained here on a ToyStreets caption corpus).
- :mod:`.sd_controlnet` -- Stable Diffusion 1.5 + segmentation ControlNet from local folders.
- :mod:`.text` -- the sentence encoder and the pretraining captions.
- :mod:`.adapt` -- paired dataset and the ZoDi loss (a ``loss_fn`` for ``seg.train_segmenter``).
- :mod:`.protocol` -- transferred sets on disk, per-condition evaluation, summaries.
- :mod:`.workbook` -- what notebook 04 and the CLI share (settings from a profile, backend building).
"""
from dasslab.zeroshot.adapt import PairedDataset, ZoDiLoss, feature_similarity, pooled_features
from dasslab.zeroshot.backends import (
    BACKENDS,
    TransferBackend,
    colour_layout,
    make_backend,
    one_hot_layout,
)
from dasslab.zeroshot.inversion import stochastic_inversion_transfer
from dasslab.zeroshot.protocol import beats, evaluate_condition, summary_table, transfer_set
from dasslab.zeroshot.workbook import register

__all__ = [
    "BACKENDS",
    "PairedDataset",
    "TransferBackend",
    "ZoDiLoss",
    "beats",
    "colour_layout",
    "evaluate_condition",
    "feature_similarity",
    "make_backend",
    "one_hot_layout",
    "pooled_features",
    "register",
    "stochastic_inversion_transfer",
    "summary_table",
    "transfer_set",
]
