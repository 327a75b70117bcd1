"""Seconds per segmenter training at a profile's [seg] budget (demo target: <= 15 s on 2 CPU cores).

The demo run trains about 30 segmenters (methods x seeds), so one training's wall time decides
whether the demo fits its 30 minutes. This times ``seg.train_segmenter`` (the real loop:
Accelerate, augmentation, optimizer, scheduler) on an in-memory set of the profile's image size
and projects the full budget from the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dasslab import runs, seg

TARGET_SECONDS = {"demo": 15.0, "tiny": 2.0}


def measure(profile: str, steps: int) -> dict:
    cfg = runs.load_config(profile, run_dir="/tmp/dasslab-bench")
    threads = runs.set_threads()
    H, W = cfg.data.size
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "image": torch.rand(3, H, W, generator=g) * 2 - 1,
            "label": torch.randint(0, 19, (H, W), generator=g),
            "name": f"b{i}",
        }
        for i in range(64)
    ]
    tc = seg.train_config(cfg, seed=0, iters=steps)
    spec = seg.model_spec(cfg)
    model = seg.build_segmenter(spec["name"], 19, **spec["kwargs"])
    seg.train_segmenter(model, items, seg.train_config(cfg, seed=0, iters=3), device="cpu")  # warm-up
    model = seg.build_segmenter(spec["name"], 19, **spec["kwargs"])
    t0 = time.perf_counter()
    seg.train_segmenter(model, items, tc, device="cpu")
    sec_per_iter = (time.perf_counter() - t0) / steps
    projected = sec_per_iter * cfg.seg.iters
    target = TARGET_SECONDS.get(profile)
    return {
        "profile": profile,
        "model": spec,
        "size": [H, W],
        "batch_size": cfg.seg.batch_size,
        "iters": cfg.seg.iters,
        "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "sec_per_iter": sec_per_iter,
        "projected_train_seconds": projected,
        "target_seconds": target,
        "ok": None if target is None else projected <= target,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--steps", type=int, default=60, help="timed training steps")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seg_train_speed.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    res = measure(args.profile, args.steps)
    runs.atomic_save_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
