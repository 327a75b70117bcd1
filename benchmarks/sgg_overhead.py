"""Time per image of SGG relative to SDEdit at a profile's notebook-02 setting (target: <= 2.5x).

SGG adds, per reverse step, one forward and backward pass of the guide: on the whole batch for GSG,
on every (image, class) pair for LCG. This times ``sgg.sgg_translate`` with and without the guide on
the same ToyStreets scenes (real label maps, so the class count per image is realistic), with the
profile's DDPM UNet preset (random weights: speed does not depend on them) or a run's trained DDPM,
and the profile's guide architecture. CPU time is reported beside wall time: on a shared machine the
wall time is inflated by other processes, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dasslab import runs, seg, toystreets
from dasslab.diffusion import ddpm, sampling, sgg

TARGET_RATIO = 2.5


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def measure(profile: str, n: int, repeats: int, run_dir: str | None) -> dict:
    cfg = runs.load_config(profile, notebook="02_semantic_gradient_guidance", run_dir="/tmp/dasslab-bench")
    threads = runs.set_threads()
    nb = cfg.nb
    H, W = cfg.data.size
    if run_dir:
        pipe = ddpm.load_ddpm(Path(run_dir) / "artifacts" / "ddpm", device="cpu")
        unet, scheduler = pipe.unet, pipe.scheduler
        H, W = unet.config.sample_size
    else:
        tc = ddpm.train_config(
            runs.load_config(profile, notebook=ddpm.NOTEBOOK, run_dir="/tmp/dasslab-bench")
        )
        torch.manual_seed(0)
        unet = ddpm.build_unet(tc.size, sample_size=(H, W)).eval().requires_grad_(False)
        scheduler = ddpm.build_scheduler(tc)
    name, kwargs = sgg.guide_spec(nb)
    guide = seg.build_segmenter(name, 19, **kwargs).eval()
    scenes = [toystreets.render(1000 + i, (H, W), "source") for i in range(n)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in scenes])
    y = torch.stack([torch.from_numpy(lab.astype(np.int64)) for _, lab in scenes])
    cfg_sgg = sgg.run_config(cfg)
    classes = float(np.mean([len(set(np.unique(lab)) - {255}) for _, lab in scenes]))

    def run(g, c):
        return lambda: sgg.sgg_translate(unet, scheduler, x, y, g, c, generator=sampling.generators(range(n)))

    run(None, cfg_sgg)()  # warm-up
    res = {}
    for label, g, c in (
        ("sdedit", None, cfg_sgg),
        ("sgg", guide, cfg_sgg),
        ("lcg_only", guide, cfg_sgg.replace(schedule="lcg")),
        ("gsg_only", guide, cfg_sgg.replace(schedule="gsg")),
    ):
        times = [_timed(run(g, c)) for _ in range(repeats)]
        res[label] = {
            "wall_per_image": min(t[0] for t in times) / n,
            "cpu_per_image": min(t[1] for t in times) / n,
        }
    ratio = {
        k: {
            "wall": v["wall_per_image"] / res["sdedit"]["wall_per_image"],
            "cpu": v["cpu_per_image"] / res["sdedit"]["cpu_per_image"],
        }
        for k, v in res.items()
    }
    return {
        "profile": profile,
        "setting": cfg_sgg.to_dict(),
        "guide": {"name": name, "kwargs": kwargs, "params": sum(p.numel() for p in guide.parameters())},
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "size": [H, W],
        "batch": n,
        "classes_per_image": classes,
        "threads": threads,
        "per_image": res,
        "ratio_to_sdedit": ratio,
        "target_ratio": TARGET_RATIO,
        "ok": ratio["sgg"]["cpu"] <= TARGET_RATIO,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--n", type=int, default=32, help="images per batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--run-dir", default=None, help="use this run's trained DDPM (else random weights)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sgg_overhead.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    res = measure(args.profile, args.n, args.repeats, args.run_dir)
    runs.atomic_save_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
