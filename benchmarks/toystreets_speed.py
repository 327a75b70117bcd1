"""ToyStreets generation and SegFolder reading speed (demo target: the whole demo set in <= 60 s, 1 core).

Notebook 00 generates the benchmark on first use, and every training loop reads it through
``SegFolder``; both must stay cheap on a 2-core machine. This times ``toystreets.generate`` for a
profile's [data] table into a temporary root, ``toystreets.render`` per image at several sizes, and
``SegFolder.__getitem__`` with and without the in-memory cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dasslab import datasets, runs, toystreets

TARGET_SECONDS = {"demo": 60.0, "tiny": 5.0}


def measure(profile: str) -> dict:
    cfg = runs.load_config(profile, run_dir="/tmp/dasslab-bench")
    d = cfg.data
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "toy"
        t0 = time.perf_counter()
        out = toystreets.generate(root, d.size, d.n_train, d.n_val, d.seed, d.conditions, progress=False)
        gen_s = time.perf_counter() - t0
        read = {}
        for cache in (False, True):
            ds = datasets.SegFolder(root / "cityscapes", "cityscapes", split="train", cache=cache)
            for i in range(len(ds)):  # first pass (fills the cache when on)
                ds[i]
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            read["cached" if cache else "uncached"] = len(ds) / (time.perf_counter() - t0)
    per_size = {}
    for size in [(32, 64), (64, 128), (128, 256), (256, 512)]:
        t0 = time.perf_counter()
        n = 0
        for s in range(8):
            for dom, cond in (("source", "day"), ("target", "day"), ("target", "night")):
                toystreets.render(s, size, dom, cond)
                n += 1
        per_size[f"{size[0]}x{size[1]}"] = (time.perf_counter() - t0) / n
    target = TARGET_SECONDS.get(profile)
    return {
        "profile": profile, "size": list(d.size), "images": sum(out["counts"].values()),
        "generate_seconds": gen_s, "target_seconds": target, "ok": None if target is None else gen_s <= target,
        "render_seconds_per_image": per_size, "read_items_per_second": read,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "toystreets_speed.json")
    args = ap.parse_args()
    res = measure(args.profile)
    runs.atomic_save_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
