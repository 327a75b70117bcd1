"""What notebook 04 and the ``dasslab zodi-*`` commands share: settings from a profile, the backend,
the transferred sets, the strength sweep, and the CLI.

The profile's ``["04_zero_shot_zodi"]`` table holds the knobs (prompts, strengths, sampler, the
embedded generator's ``embedded`` sub-table, the adaptation budget). Nothing here trains in a loop of
its own: pretraining lives in :mod:`.embedded`, adaptation in ``seg.train_segmenter``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dasslab import runs
from dasslab.zeroshot.backends import BACKENDS, TransferBackend
from dasslab.zeroshot.text import ZODI_PROMPTS

NOTEBOOK = "04_zero_shot_zodi"
PRODUCER = NOTEBOOK
#: ZoDi's official strengths (PAPERS.md), the default when a profile names none.
ZODI_STRENGTHS = {"night": 0.90, "snow": 0.65, "rain": 0.65, "fog": 0.60, "game": 0.60}


def _nb(cfg) -> dict:
    return cfg.get("nb", {}) or {}


def prompt_for(cfg, condition: str) -> str:
    prompts = _nb(cfg).get("prompts") or {}
    p = prompts.get(condition) or ZODI_PROMPTS.get(condition)
    if not p:
        raise KeyError(f"no prompt for condition {condition!r}: add it to prompts in the profile's "
                       f"[\"{NOTEBOOK}\"] table")
    return p


def strength_for(cfg, condition: str) -> float:
    s = (_nb(cfg).get("strengths") or {}).get(condition, ZODI_STRENGTHS.get(condition))
    if s is None:
        raise KeyError(f"no strength for condition {condition!r} in the profile's [\"{NOTEBOOK}\"] table")
    return float(s)


def embedded_config(cfg):
    """The :class:`EmbeddedConfig` of the profile (image size from ``[data] size`` unless set)."""
    from dasslab.zeroshot.embedded import EmbeddedConfig

    table = dict(_nb(cfg).get("embedded") or {})
    table.setdefault("size", list(cfg.data.get("size", (32, 64))))
    return EmbeddedConfig.from_dict(table)


def embedded_dir(cfg, rd) -> Path:
    """Where the embedded generator with the profile's settings lives (``cache_dir`` shares it)."""
    from dasslab.zeroshot.embedded import cache_dir_for

    root = _nb(cfg).get("cache_dir") or ""
    root = Path(root).expanduser() if root else Path(rd.artifacts) / "zodi_embedded"
    if not root.is_absolute():
        root = runs.project_root() / root
    return cache_dir_for(root, embedded_config(cfg))


def ensure_embedded(cfg, rd, render=None, seed_offset=None, device=None, progress: bool = True) -> Path:
    """Pretrains the embedded generator unless a finished one with the same settings exists."""
    from dasslab.zeroshot.embedded import pretrain

    return pretrain(embedded_config(cfg), embedded_dir(cfg, rd), render=render, seed_offset=seed_offset,
                    device=device or cfg.get("device", "auto"), progress=progress)


def build_backend(cfg, rd, device=None, **overrides) -> TransferBackend:
    """The profile's backend with its sampler settings (``overrides`` win)."""
    from dasslab.zeroshot.backends import make_backend

    nb = _nb(cfg)
    name = overrides.pop("backend", None) or nb.get("backend", "embedded")
    dev = runs.pick_device(device or cfg.get("device", "auto"))
    common = {k: nb[k] for k in ("num_inference_steps", "guidance_scale", "eta", "prompt_suffix",
                                 "negative_prompt") if k in nb}
    common.update(overrides)
    if name == "embedded":
        model_dir = embedded_dir(cfg, rd)
        rd.require(model_dir / "config.json", PRODUCER)
        return make_backend("embedded", model_dir=model_dir, device=dev, **common)
    if name == "sd-controlnet":
        if not nb.get("sd_model_dir"):
            raise ValueError(f"backend 'sd-controlnet' needs sd_model_dir (a local Stable Diffusion 1.5 folder) "
                             f"in the profile's [\"{NOTEBOOK}\"] table or as a parameter")
        root = runs.project_root()

        def path(p):
            p = Path(p).expanduser()
            return p if p.is_absolute() else root / p

        extra = {k: nb[k] for k in ("short_side", "controlnet_scale") if k in nb}
        extra.update({k: overrides[k] for k in ("short_side", "controlnet_scale") if k in overrides})
        common = {k: v for k, v in common.items() if k not in extra}
        return make_backend("sd-controlnet", model_dir=path(nb["sd_model_dir"]),
                            controlnet_dir=path(nb["controlnet_dir"]) if nb.get("controlnet_dir") else None,
                            device=dev, **common, **extra)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def limited_source(cfg, sets):
    """The source set, limited to ``n_source`` items (0 = all; seeded choice)."""
    from dasslab.zeroshot.protocol import source_set

    src = source_set(sets, cfg)
    n = int(_nb(cfg).get("n_source", 0) or 0)
    return src.take(n, seed=int(cfg.data.get("seed", 0))) if n and hasattr(src, "take") else src


def transfer_conditions(cfg, rd, backend, source, conditions, progress: bool = True) -> dict:
    """Transferred set per condition in ``rd.translated("zodi_<condition>")`` (reused when done)."""
    from dasslab.zeroshot.protocol import transfer_set

    nb = _nb(cfg)
    out = {}
    for c in conditions:
        out[c] = transfer_set(backend, source, rd.translated(f"zodi_{c}"), prompt_for(cfg, c), strength_for(cfg, c),
                              condition=c, seed=int(nb.get("transfer_seed", 42)),
                              batch_size=int(nb.get("transfer_batch", 32)), progress=progress)
    return out


def sample_batch(dataset, n: int, seed: int = 0) -> dict:
    """``n`` items of a dataset (seeded choice) collated into image/label tensors and names."""
    g = np.random.default_rng(seed)
    idx = sorted(g.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist())
    items = [dataset[i] for i in idx]
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items]),
            "name": [it["name"] for it in items]}


@torch.no_grad()
def strength_sweep(backend, batch: dict, prompt: str, strengths, seed: int = 42, reference=None,
                   look_images=None) -> tuple[pd.DataFrame, dict]:
    """Transfers one batch at several strengths.

    Returns a table (strength, label_consistency, kid_to_look, kid_to_source, mean change) and the
    images per strength. ``reference`` (a segmenter) scores how well the transfer keeps the source
    layout (mIoU against the source labels); ``look_images`` (e.g. a few images of the named domain)
    give a domain distance. Both are diagnostics for the chapter, never used to adapt or select.
    """
    from dasslab import metrics
    from dasslab.metrics import ConfusionMatrix

    rows, images = [], {}
    for s in strengths:
        out = backend.transfer(batch["image"], batch["label"], prompt, float(s), torch.Generator().manual_seed(seed))
        images[float(s)] = out
        row = {"strength": float(s), "mean_abs_change": float((out - batch["image"]).abs().mean())}
        if reference is not None:
            dev = next(reference.parameters()).device
            pred = reference.eval()(out.to(dev)).argmax(1).cpu()
            cm = ConfusionMatrix(19)
            cm.update(pred, batch["label"])
            row["label_consistency"] = 100.0 * float(cm.miou())
        if look_images is not None:
            row["kid_to_look"] = metrics.domain_distance(out, look_images, n_subsets=20,
                                                         subset_size=min(len(out), len(look_images)))["kid"]
            row["kid_to_source"] = metrics.domain_distance(out, batch["image"], n_subsets=20,
                                                           subset_size=len(out))["kid"]
        rows.append(row)
    return pd.DataFrame(rows), images


# ------------------------------------------------------------------------------------------ CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("zodi-transfer", help="ZoDi: transfer the source set to adverse conditions named "
                                                    "by prompts (pretrains the embedded generator if needed)")
    _common(p)
    p.add_argument("--backend", choices=BACKENDS, default=None, help="layout-to-image backend (profile's default)")
    p.add_argument("--prompt", default=None, help="prompt (with one --condition): overrides the profile's")
    p.add_argument("--strength", type=float, default=None, help="inversion strength in [0,1] (with one --condition)")
    p.add_argument("--sd-model-dir", default=None, help="local Stable Diffusion 1.5 folder (sd-controlnet)")
    p.add_argument("--controlnet-dir", default=None, help="local segmentation ControlNet folder (sd-controlnet)")
    p.set_defaults(func=_cmd_transfer)
    q = subparsers.add_parser("zodi-adapt", help="ZoDi: adapt segmenters on source + transferred sets and "
                                                 "score them on each condition's val split")
    _common(q)
    q.add_argument("--variants", nargs="+", default=["source-only", "transfer", "zodi", "oracle"],
                   choices=["source-only", "transfer", "zodi", "oracle"])
    q.add_argument("--seeds", nargs="+", type=int, default=None, help="segmenter seeds (profile's by default)")
    q.set_defaults(func=_cmd_adapt)


def _common(p) -> None:
    p.add_argument("--profile", default="demo")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<profile>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--conditions", nargs="+", default=None, help="adverse conditions (profile's by default)")


def _load(args):
    cfg = runs.load_config(args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device)
    return cfg, runs.RunDir(cfg.run_dir)


def _cmd_transfer(args) -> int:
    from dasslab import datasets

    cfg, rd = _load(args)
    runs.set_threads()
    nb = cfg.nb
    if args.backend:
        nb["backend"] = args.backend
    if args.sd_model_dir:
        nb["sd_model_dir"] = args.sd_model_dir
    if args.controlnet_dir:
        nb["controlnet_dir"] = args.controlnet_dir
    conds = args.conditions or list(nb.get("conditions") or cfg.data.get("conditions", []))
    if (args.prompt or args.strength is not None) and len(conds) != 1:
        raise ValueError("--prompt/--strength apply to one condition: give exactly one --conditions value")
    if args.prompt:
        nb.setdefault("prompts", {})[conds[0]] = args.prompt
    if args.strength is not None:
        nb.setdefault("strengths", {})[conds[0]] = args.strength
    if nb.get("backend", "embedded") == "embedded":
        ensure_embedded(cfg, rd)
    backend = build_backend(cfg, rd)
    sets = datasets.benchmark_sets(cfg)
    out = transfer_conditions(cfg, rd, backend, limited_source(cfg, sets), conds)
    for c, ds in out.items():
        print(f"{c}: {len(ds)} images -> {ds.root}")
    return 0


def _cmd_adapt(args) -> int:
    from dasslab import datasets
    from dasslab.zeroshot.protocol import evaluate_condition, seg_config, summary_table

    cfg, rd = _load(args)
    runs.set_threads()
    nb = cfg.nb
    conds = args.conditions or list(nb.get("eval_conditions") or cfg.data.get("conditions", []))
    scfg = seg_config(cfg, iters=nb.get("seg_iters"))
    seeds = args.seeds or list(nb.get("seeds") or cfg.seg.seeds)
    sets = datasets.benchmark_sets(cfg)
    source = limited_source(cfg, sets)
    tables = []
    for c in conds:
        folder = rd.require(rd.translated(f"zodi_{c}") / "translation.json", PRODUCER).parent
        transferred = datasets.SegFolder(folder, "gta5")
        tables.append(evaluate_condition(rd, scfg, sets, c, transferred, variants=args.variants, seeds=seeds,
                                         lambda_sim=float(nb.get("lambda_sim", 0.1)), source=source))
    summary = summary_table(pd.concat(tables, ignore_index=True))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    path = rd.metrics_dir / "zodi_adapt_cli.json"
    runs.atomic_save_json(path, {"summary": summary.to_dict(orient="records"), "seeds": seeds,
                                 "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}", file=sys.stderr)
    return 0
