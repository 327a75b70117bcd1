"""Translation throughput (images/s) of SDEdit, SGG, SGG+PTL, DA-KPN and CycleGAN on one batch and
device, the guidance overhead as a ratio to SDEdit in the same run, and peak memory.

All translators see the same batch of ToyStreets source scenes (real label maps, so the classes per
image are realistic) at a profile's image size, with the profile's architectures (random weights,
or a run's trained DDPM with --run-dir: speed does not depend on the weights).

SGG+PTL costs more than SGG only at training time: its final translation is one SGG pass at depth
K_S; before it, every intermediate stage s < S translates ``stage_n`` images at depth K_s and
fine-tunes the guide. The amortised per-image cost over the source set is reported beside the
per-pass cost (guide fine-tuning is timed with the real trainer).

Peak memory: CUDA max allocated on a GPU; on the CPU the process's peak RSS sampled during each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from dasslab import cyclegan, kpn, runs, seg, toystreets
from dasslab.diffusion import ddpm, ptl, sampling, sgg

TARGET_RATIO = 2.5


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or sampled process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _sample(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._t.join()
        return False


def _timed(fn, device, repeats: int) -> dict:
    best_w = best_c = float("inf")
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best_w, best_c = min(best_w, time.perf_counter() - w0), min(best_c, time.process_time() - c0)
    return {"wall": best_w, "cpu": best_c, "peak_mem_mb": round(mem.peak / 2**20, 1)}


def measure(profile: str, n: int, repeats: int, run_dir: str | None, device: str) -> dict:
    dev = runs.pick_device(device)
    threads = runs.set_threads()
    cfg02 = runs.load_config(profile, notebook="02_semantic_gradient_guidance", run_dir="/tmp/dasslab-bench")
    cfg03 = runs.load_config(profile, notebook="03_progressive_translation", run_dir="/tmp/dasslab-bench")
    cfg05 = runs.load_config(profile, notebook="05_kpn_baseline", run_dir="/tmp/dasslab-bench")
    H, W = cfg02.data.size
    if run_dir:
        pipe = ddpm.load_ddpm(Path(run_dir) / "artifacts" / "ddpm", device=dev)
        unet, scheduler = pipe.unet, pipe.scheduler
        H, W = unet.config.sample_size
    else:
        tc = ddpm.train_config(runs.load_config(profile, notebook=ddpm.NOTEBOOK, run_dir="/tmp/dasslab-bench"))
        torch.manual_seed(0)
        unet = ddpm.build_unet(tc.size, sample_size=(H, W))
        scheduler = ddpm.build_scheduler(tc)
    unet = unet.to(dev).eval().requires_grad_(False)
    gname, gkw = sgg.guide_spec(cfg02.nb)
    guide = seg.build_segmenter(gname, 19, **gkw).to(dev).eval()
    scenes = [toystreets.render(1000 + i, (H, W), "source") for i in range(n)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in scenes]).to(dev)
    y = torch.stack([torch.from_numpy(lab.astype(np.int64)) for _, lab in scenes]).to(dev)
    base = sgg.run_config(cfg02)

    def diffusion(g, strength):
        c = base.replace(strength=strength)
        return lambda: sgg.sgg_translate(unet, scheduler, x, y, g, c, generator=sampling.generators(range(n)))

    # DA-KPN and CycleGAN at the profile's sizes (the frozen segmenter is the [seg] model)
    kcfg = kpn.kpn_config(cfg05).resolved((H, W))
    segm = seg.build_segmenter(cfg05.seg["model"], 19, **dict(cfg05.seg.get("model_kwargs", {})))
    kmodel = kpn.train.build_model(segm, (H, W), kcfg).to(dev).eval()
    gen = cyclegan.cyclegan_config(cfg05).build().g_st.to(dev).eval()

    diffusion(None, base.strength)()  # warm-up
    res = {
        "sdedit": _timed(diffusion(None, base.strength), dev, repeats),
        "sgg": _timed(diffusion(guide, base.strength), dev, repeats),
    }
    with torch.no_grad():
        kmodel(x)
        res["kpn"] = _timed(lambda: kmodel(x), dev, repeats)
        res["cyclegan"] = _timed(lambda: gen(x), dev, repeats)

    # SGG+PTL, amortised over the source set: intermediate stages on stage_n images + guide fine-tuning
    depths = [float(s) for s in cfg03.nb["strengths"]]
    n_src = int(cfg03.data.n_train)
    stage_n = int(cfg03.nb.get("stage_n", 0)) or n_src
    stage_pass = {d: _timed(diffusion(guide, d), dev, 1)["wall"] / n for d in depths[:-1]}
    ft_iters = int(cfg03.nb["finetune_iters"])
    steps = 10
    items = [{"image": x[i].cpu(), "label": y[i].cpu()} for i in range(n)]
    tc = dataclasses.replace(ptl.finetune_config(cfg03), iters=steps, ckpt_every=0)
    t0 = time.perf_counter()
    seg.train_segmenter(guide.train(), items, tc, device=dev, desc="guide fine-tuning (timed)")
    ft_seconds = (time.perf_counter() - t0) / steps * ft_iters
    guide.eval()
    per_img = {k: v["wall"] / n for k, v in res.items()}
    ptl_amortised = per_img["sgg"] + sum(stage_pass.values()) * stage_n / n_src
    ptl_amortised += ft_seconds * (len(depths) - 1) / n_src
    return {
        "benchmark": "translation_throughput", "profile": profile, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": threads, "batch": n, "size": [H, W],
        "classes_per_image": float(np.mean([len(set(np.unique(lab)) - {255}) for _, lab in scenes])),
        "sgg_setting": base.to_dict(),
        "images_per_second": {k: round(1 / v, 2) for k, v in per_img.items()}
        | {"sgg+ptl (amortised over the source set)": round(1 / ptl_amortised, 2)},
        "seconds_per_image": {k: round(v, 5) for k, v in per_img.items()}
        | {"sgg+ptl": round(ptl_amortised, 5)},
        "cpu_seconds_per_image": {k: round(v["cpu"] / n, 5) for k, v in res.items()},
        "peak_mem_mb": {k: v["peak_mem_mb"] for k, v in res.items()},
        "ptl": {"depths": depths, "stage_n": stage_n, "n_source": n_src,
                "intermediate_pass_seconds_per_image": stage_pass,
                "guide_finetune_seconds_per_stage": ft_seconds},
        "guidance_overhead": {"wall": round(per_img["sgg"] / per_img["sdedit"], 3),
                              "cpu": round(res["sgg"]["cpu"] / res["sdedit"]["cpu"], 3)},
        "target_overhead": TARGET_RATIO,
        "met": per_img["sgg"] / per_img["sdedit"] <= TARGET_RATIO,
        "cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--n", type=int, default=32, help="images per batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--run-dir", default=None, help="use this run's trained DDPM (else random weights)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    res = measure(args.profile, args.n, args.repeats, args.run_dir, args.device)
    out = args.out or Path(__file__).parent / "results" / f"translation_throughput_{res['device'].split(':')[0]}.json"
    runs.atomic_save_json(out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
