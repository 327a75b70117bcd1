"""SDEdit translation with the target DDPM: noise a source image to step n, denoise with the model.

strength = n / T sets the trade: a small n keeps the source layout and much of its look, a large n
gives the target look and forgets the layout (Peng et al.'s motivation for label guidance).
:func:`translate_dataset` writes a whole source set in the source layout with the source labels, so
every downstream consumer reads it with the one reader; it is also the loop SGG / PTL reuse through
``make_guidance``. Each image has its own seed (from the run seed and its name), so results do not
depend on batch size or order, and a rerun skips images already written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dasslab import runs

from . import sampling
from .sampling import Hook

NOTEBOOK = "01_target_diffusion"
RECORD = "translation.json"
PARTIAL = ".translation-params.json"


def image_seed(seed: int, name: str) -> int:
    """A per-image seed from the run seed and the image name (stable across batchings)."""
    return int.from_bytes(hashlib.sha1(f"{int(seed)}:{name}".encode()).digest()[:7], "big")


def _unet_and_scheduler(pipeline_or_unet, scheduler):
    if hasattr(pipeline_or_unet, "unet") and hasattr(pipeline_or_unet, "scheduler"):
        return pipeline_or_unet.unet, scheduler if scheduler is not None else pipeline_or_unet.scheduler
    if scheduler is None:
        raise ValueError("a bare UNet needs its scheduler: pass scheduler=... (or a DDPMPipeline)")
    return pipeline_or_unet, scheduler


def reverse_scheduler(scheduler, steps: int | None, sampler: str = "auto"):
    """The scheduler of the reverse chain: DDIM when ``steps`` is given (``sampler="auto"``), else the
    full ancestral DDPM chain; ``sampler="ddpm"`` with ``steps`` gives a skipped ancestral chain."""
    if sampler not in ("auto", "ddim", "ddpm"):
        raise ValueError(f"sampler={sampler!r}: use 'auto', 'ddim' or 'ddpm'")
    if sampler == "ddim" or (sampler == "auto" and steps):
        return sampling.as_ddim(scheduler)
    return sampling.as_ddpm(scheduler)


def sdedit(unet, scheduler, x0: torch.Tensor, strength: float, generator=None, steps: int | None = None,
           sampler: str = "auto", eta: float = 0.0, guidance: Hook | None = None, x0_hook: Hook | None = None,
           progress: bool | str = False) -> torch.Tensor:
    """Translates a batch ``x0`` (B,3,H,W in [-1,1]). ``steps``: DDIM steps over the full chain
    (strength 0.5 with 50 runs 25); None: every DDPM step. ``generator``: one, or one per image
    (first the forward noise, then the reverse chain draw from it). Strength 0 returns ``x0``."""
    sched = reverse_scheduler(scheduler, steps, sampler)
    ts = sampling.sdedit_timesteps(sched, strength, steps)
    if not ts:
        return x0.detach().float().cpu().clone()
    device = next(unet.parameters()).device
    x0 = x0.to(device=device, dtype=torch.float32)
    xt = sampling.noise_to(sched, x0, ts[0], generator)
    out = sampling.reverse_diffusion(unet, sched, xt, ts, generator=generator, guidance=guidance,
                                     x0_hook=x0_hook, eta=eta if sampling.scheduler_kind(sched) == "ddim" else 0.0,
                                     progress=progress)
    return out.float().cpu()


def model_fingerprint(unet) -> str:
    """sha1 of the UNet weights (which model made a translated set)."""
    h = hashlib.sha1()
    for k, v in sorted(unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _source_info(ds) -> dict:
    return {k: str(getattr(ds, k)) for k in ("root", "preset", "split", "condition", "size") if getattr(ds, k, None) is not None}


def _done(out_dir: Path, name: str) -> bool:
    return (out_dir / "images" / f"{name}.png").is_file() and (out_dir / "labels" / f"{name}.png").is_file()


def _collate(items):
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.stack([torch.as_tensor(it["label"]) for it in items]),
            "name": [it["name"] for it in items]}


def translate_dataset(pipeline_or_unet, scheduler, source_dataset, out_dir, strength: float,
                      batch_size: int = 16, seed: int = 0, steps: int | None = None, sampler: str = "auto",
                      eta: float = 0.0, method: str = "sdedit",
                      make_guidance: Callable[[dict], Hook | None] | None = None, params: dict | None = None,
                      limit: int | None = None, progress: bool = True) -> dict:
    """Translates every image of ``source_dataset`` (items with image, label, name) into ``out_dir``
    in GTA5 layout (images/, labels/ with the source labels) and writes ``translation.json``.

    Resumable: images already written with the same settings are skipped; different settings
    (method, strength, steps, sampler, eta, seed, model, ``params``) restart the folder.
    ``make_guidance(batch) -> hook`` builds a guidance hook per batch (SGG); ``params`` go into the
    record. ``limit``: only the first n images (sweeps). Returns the record.
    """
    from dasslab import datasets

    unet, scheduler = _unet_and_scheduler(pipeline_or_unet, scheduler)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} must lie in [0, 1]")
    out_dir = Path(out_dir)
    n = len(source_dataset) if limit is None else min(int(limit), len(source_dataset))
    if n == 0:
        raise ValueError(f"source dataset {source_dataset!r} is empty")
    names = list(getattr(source_dataset, "names", [None] * n))[:n]
    sched = reverse_scheduler(scheduler, steps, sampler)
    ts = sampling.sdedit_timesteps(sched, strength, steps)
    settings = {"method": method, "strength": float(strength), "steps": steps, "sampler": sampling.scheduler_kind(sched),
                "eta": float(eta), "seed": int(seed), "t_start": ts[0] if ts else -1, "reverse_steps": len(ts),
                "num_train_timesteps": sampling.num_train_timesteps(sched), "model": model_fingerprint(unet),
                "params": runs.to_jsonable(params or {})}
    sample_size = getattr(getattr(unet, "config", None), "sample_size", None)

    # settings changed since an earlier (partial or complete) run: start the folder again
    prev_sec = None
    for marker in (out_dir / PARTIAL, out_dir / RECORD):
        if marker.is_file():
            old = json.loads(marker.read_text())
            if {k: old.get(k) for k in settings} != runs.to_jsonable(settings):
                for sub in ("images", "labels"):
                    shutil.rmtree(out_dir / sub, ignore_errors=True)
                for m in (out_dir / PARTIAL, out_dir / RECORD):
                    m.unlink(missing_ok=True)
                prev_sec = None
                break
            prev_sec = old.get("seconds_per_image", prev_sec)
    (out_dir / RECORD).unlink(missing_ok=True)
    runs.atomic_save_json(out_dir / PARTIAL, {**settings, "seconds_per_image": prev_sec})

    todo = [i for i in range(n) if names[i] is None or not _done(out_dir, names[i])]
    t0 = time.perf_counter()
    bar = runs.progress(total=n, initial=n - len(todo), desc=f"{method} s={strength:g}",
                         **({} if progress else {"disable": True}))
    for b in range(0, len(todo), batch_size):
        items = [source_dataset[i] for i in todo[b:b + batch_size]]
        if any("label" not in it for it in items):
            raise ValueError(f"source dataset {source_dataset!r} has no labels: a translated set keeps the source labels")
        batch = _collate(items)
        x = batch["image"]
        if sample_size is not None:
            hw = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
            if tuple(x.shape[-2:]) != hw:
                raise ValueError(f"source images are {x.shape[-2]}x{x.shape[-1]} but the DDPM was trained at "
                                 f"{hw[0]}x{hw[1]}: open the source set with size={hw}")
        gens = sampling.generators([image_seed(seed, nm) for nm in batch["name"]])
        hook = make_guidance(batch) if make_guidance is not None else None
        y = sdedit(unet, sched, x, strength, gens, steps=steps, sampler=sampler, eta=eta, guidance=hook)
        datasets.write_translated(out_dir, batch["name"], y, batch["label"])
        bar.update(len(items))
    bar.close()
    seconds = time.perf_counter() - t0
    record = dict(settings)
    record.update({"n_images": n,
                   "seconds_per_image": seconds / len(todo) if todo else prev_sec,
                   "source": _source_info(source_dataset), "device": str(next(unet.parameters()).device)})
    runs.atomic_save_json(out_dir / PARTIAL, {**settings, "seconds_per_image": record["seconds_per_image"]})
    runs.atomic_save_json(out_dir / RECORD, record)
    return record


def read_record(out_dir) -> dict:
    p = Path(out_dir) / RECORD
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: {out_dir} is not a finished translated set")
    return json.loads(p.read_text())


def translated_set(out_dir, size=None):
    """The translated folder as a SegFolder (GTA5 layout)."""
    from dasslab import datasets

    read_record(out_dir)
    return datasets.SegFolder(out_dir, "gta5", split=None, size=size)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _cmd_sdedit(args) -> int:
    from dasslab import datasets

    from .ddpm import ddpm_dir, load_ddpm, resolution

    cfg = runs.load_config(args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device,
                           data_root=args.data_root)
    nb = cfg.nb
    strength = args.strength if args.strength is not None else nb.get("strength")
    if strength is None or not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength} must lie in [0, 1]")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1 (omit it for the full DDPM chain)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    runs.set_threads()
    rd = runs.RunDir(cfg.run_dir)
    pipe = load_ddpm(rd.require(ddpm_dir(rd), NOTEBOOK), device=cfg.device)
    sets = datasets.benchmark_sets(cfg, size=resolution(cfg))
    key = f"source_{args.split}"
    out = Path(args.out) if args.out else rd.translated(args.method)
    steps = args.steps if args.steps is not None else (nb.get("ddim_steps") or None)
    rec = translate_dataset(pipe, None, sets[key], out, strength, batch_size=args.batch_size,
                            seed=args.seed if args.seed is not None else nb.get("seed", 0), steps=steps,
                            eta=args.eta, method=args.method)
    print(f"{rec['n_images']} images translated (strength {strength}, {rec['reverse_steps']} reverse steps) "
          f"into {out}; {rec['seconds_per_image'] or 0:.3f} s per image")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sdedit", help="SDEdit-translate the source set with the run's target DDPM",
        description="Translate the source images into the target style with the DDPM of notebook 01 "
                    "(noise to strength * T, denoise). Writes GTA5 layout with the source labels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", default="demo", help="profile name or .toml path")
    p.add_argument("--run-dir", required=True, help="run directory holding artifacts/ddpm")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", default=None, help="dataset root (default: the profile's)")
    p.add_argument("--strength", type=float, default=None, help="n / T in [0, 1] (default: the profile's)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps over the full chain (default: the profile's ddim_steps; 0 there = "
                        "every DDPM step)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the profile's)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="source split to translate")
    p.add_argument("--method", default="sdedit", help="name of the translated set (artifacts/translated/<method>)")
    p.add_argument("--out", default=None, help="output folder (default: artifacts/translated/<method>)")
    p.set_defaults(func=_cmd_sdedit)


__all__ = ["image_seed", "model_fingerprint", "read_record", "register", "reverse_scheduler", "sdedit",
           "translate_dataset", "translated_set"]
