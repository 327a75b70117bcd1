"""GPU path check: segmenter training with AMP, DDPM training with mixed precision, SDEdit vs SGG
throughput on CUDA. Run on a GPU box: `python benchmarks/gpu_check.py` (writes results/gpu_check.json).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dasslab import runs, seg, toystreets
from dasslab.datasets import SegFolder
from dasslab.diffusion import ddpm


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    toystreets.generate(tmp / "toy", (64, 128), 64, 16, seed=0, conditions=("night",), progress=False)
    src = SegFolder(tmp / "toy" / "gta5", preset="gta5", split="train", size=(64, 128))
    for name in ("unet-small", "deeplabv2-r101", "segformer-b0"):
        model = seg.build_segmenter(name, num_classes=19)
        for amp in (False, True):
            tc = seg.TrainConfig(iters=30, batch_size=8, lr=1e-3, seed=0, amp=amp)
            (_, hist), s = timed(lambda: seg.train_segmenter(model, [src], tc, device=dev))
            res[f"seg_{name}_amp{int(amp)}_s_per_iter"] = round(s / 30, 4)
            res[f"seg_{name}_amp{int(amp)}_final_loss"] = float(hist["loss"].iloc[-1])
    ev = seg.evaluate(model, src, device=dev)
    res["seg_eval_cuda_mIoU_finite"] = bool(ev["mIoU"] == ev["mIoU"])
    for amp in (False, True):
        tc = ddpm.DDPMTrainConfig(size="demo", steps=40, batch_size=16, amp=amp, ckpt_every=1000)
        (pipe, hist), s = timed(lambda: ddpm.train_ddpm(src, tc, tmp / f"ddpm{amp}", device=dev, overwrite=True))
        res[f"ddpm_amp{int(amp)}_s_per_step"] = round(s / 40, 4)
        res[f"ddpm_amp{int(amp)}_loss_first_last"] = [float(hist["loss"].iloc[0]), float(hist["loss"].iloc[-1])]
    res["ok"] = True
    out = Path(__file__).parent / "results" / "gpu_check.json"
    runs.atomic_save_json(out, res)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
