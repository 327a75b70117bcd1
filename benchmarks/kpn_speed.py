"""Seconds per DA-KPN and CycleGAN training at a profile's 05 settings (demo targets: KPN <= 60 s,
CycleGAN <= 120 s on 2 free CPU cores), and the spatially varying blur's cost at the paper kernel.

Times the real loops (``kpn.train_kpn``, ``cyclegan.train_cyclegan``: Accelerate, GRL / LSGAN steps)
on in-memory random images of the profile's size with a segmenter built from the profile's ``[seg]``
table (weights do not matter for speed), and projects the profile's full step counts. Measure on an
idle machine: shared cores inflate every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from dasslab import cyclegan, kpn, runs, seg

TARGET_SECONDS = {"demo": {"kpn": 60.0, "cyclegan": 120.0}, "tiny": {"kpn": 5.0, "cyclegan": 5.0}}


def _items(n, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, H, W, generator=g) * 2 - 1, "label": torch.zeros(H, W, dtype=torch.long),
             "name": f"b{i}"} for i in range(n)]


def _time(fn, warm, steps) -> float:
    """Seconds per step, fixed costs (data bank, Accelerate) included: a short warm-up run first."""
    fn(warm)
    t0 = time.perf_counter()
    fn(warm + steps)
    return (time.perf_counter() - t0) / (warm + steps)


def measure(profile: str, steps: int) -> dict:
    cfg = runs.load_config(profile, notebook="05_kpn_baseline", run_dir="/tmp/dasslab-bench")
    threads = runs.set_threads()
    H, W = cfg.data.size
    src, tgt = _items(64, H, W, 0), _items(64, H, W, 1)
    spec = seg.model_spec(cfg)
    segm = seg.build_segmenter(spec["name"], 19, **spec["kwargs"])
    kc, cc = kpn.kpn_config(cfg), cyclegan.cyclegan_config(cfg)
    k_sec = _time(lambda n: kpn.train_kpn(segm, src, tgt, dataclasses.replace(kc, iters=n), device="cpu"), 3, steps)
    c_sec = _time(lambda n: cyclegan.train_cyclegan(src, tgt, dataclasses.replace(cc, iters=n), device="cpu"), 3, steps)
    x = torch.rand(1, 3, 128, 256)
    t0 = time.perf_counter()
    kpn.spatial_gaussian_blur(x, torch.full_like(x, 3.0), 25)
    blur25 = time.perf_counter() - t0
    target = TARGET_SECONDS.get(profile, {})
    res = {"profile": profile, "size": [H, W], "threads": threads, "cpus": os.cpu_count(),
           "kpn": {"steps": kc.iters, "batch_size": kc.batch_size, "sec_per_step": k_sec,
                   "projected_train_seconds": k_sec * kc.iters, "target_seconds": target.get("kpn")},
           "cyclegan": {"steps": cc.iters, "batch_size": cc.batch_size, "sec_per_step": c_sec,
                        "projected_train_seconds": c_sec * cc.iters, "target_seconds": target.get("cyclegan")},
           "blur_25x25_128x256_seconds": blur25}
    for k in ("kpn", "cyclegan"):
        t = res[k]["target_seconds"]
        res[k]["ok"] = None if t is None else res[k]["projected_train_seconds"] <= t
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per translator")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kpn_speed.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    res = measure(args.profile, args.steps)
    runs.atomic_save_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
