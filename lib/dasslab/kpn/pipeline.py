"""DA-KPN from a profile: source segmenter (cached), training (resumable), translated set; CLI."""
from __future__ import annotations

import json
import time

from dasslab import runs
from dasslab.kpn import common
from dasslab.kpn.train import METHOD, NOTEBOOK, KPNConfig, load_kpn, train_kpn, translate_dataset

# profile key (in the ["05_kpn_baseline"] table) -> KPNConfig field
PROFILE_KEYS = {
    "kpn_iters": "iters", "kpn_batch_size": "batch_size", "kpn_lr": "lr", "kpn_lowres": "lowres",
    "kpn_kernel_size": "kernel_size", "kpn_hidden": "hidden", "kpn_ndf": "ndf", "kpn_disc_layers": "n_layers",
}


def kpn_config(cfg) -> KPNConfig:
    """The KPNConfig of the notebook table ``cfg.nb`` (keys ``kpn_*``; an empty ``kpn_lowres`` = size // 2)."""
    kw = {}
    for key, field in PROFILE_KEYS.items():
        if key in cfg.nb:
            v = cfg.nb[key]
            kw[field] = (list(v) or None) if field == "lowres" else v
    kw["seed"] = int(cfg.nb.get("kpn_seed", 0))
    return KPNConfig(**kw)


def source_segmenter(rd, cfg, sets):
    """The frozen source-trained segmenter: the same cached model as notebook 06's source-only row, first seed."""
    from dasslab import seg

    seed = next(iter(cfg.seg.get("seeds", [0])))
    return seg.get_or_train(rd, f"source_only-seed{seed}", [sets["source_train"]], cfg, seed=seed)


def _fingerprints(sets) -> dict:
    from dasslab import seg

    return {k: seg.dataset_fingerprint(sets[k]) for k in ("source_train", "target_train")}


def run(cfg, rd=None, sets=None, resume: bool = True, translate: bool = True) -> dict:
    """Train (or resume, or load) the DA-KPN of ``cfg`` and translate ``source_train`` into
    ``rd.translated("kpn")`` (skipped when the set there was made with the same settings).
    Checkpoints made with other settings are discarded and the KPN is trained afresh.

    Returns ``{"model", "history", "translation", "out_dir", "config", "train_seconds"}``.
    """
    from dasslab import datasets

    rd = rd or runs.RunDir(cfg.run_dir)
    sets = sets or datasets.benchmark_sets(cfg)
    device = runs.pick_device(cfg.get("device", "auto"))
    kcfg = kpn_config(cfg)
    segm = source_segmenter(rd, cfg, sets)
    out_dir = rd.artifacts / METHOD
    t0 = time.perf_counter()
    kw = {"out_dir": out_dir, "device": device, "fingerprint_extra": _fingerprints(sets)}
    try:
        model, history = train_kpn(segm, sets["source_train"], sets["target_train"], kcfg, resume=resume, **kw)
    except common.StaleCheckpoint as e:  # settings, segmenter or data changed: train afresh, as seg.get_or_train does
        print(f"DA-KPN: retraining ({e})")
        common.clear_checkpoints(out_dir)
        model, history = train_kpn(segm, sets["source_train"], sets["target_train"], kcfg, resume=False, **kw)
    train_seconds = time.perf_counter() - t0
    trained_for = float(history["sec"].iloc[-1]) if len(history) else 0.0
    meta = None
    if translate:
        params = {"train": kcfg.resolved(sets["source_train"][0]["image"].shape[-2:]).identity(),
                  "segmenter": common.weights_digest(segm), "kpn": common.weights_digest(model.predictor),
                  "source": _fingerprints(sets)["source_train"], "model": model.config}
        out = rd.translated(METHOD)
        if common.translation_is_current(out, params, len(sets["source_train"])):
            meta = json.loads((out / "translation.json").read_text())
        else:
            meta = translate_dataset(model, sets["source_train"], out, device=device, params=params)
    return {"model": model, "history": history, "translation": meta, "out_dir": out_dir, "config": kcfg,
            "train_seconds": train_seconds, "seconds_in_training_loop": trained_for}


def load(rd, cfg, sets=None):
    """The trained DA-KPN of a run directory (errors name the notebook to run first)."""
    from dasslab import datasets

    sets = sets or datasets.benchmark_sets(cfg)
    path = rd.require(rd.artifacts / METHOD / "config.json", NOTEBOOK)
    return load_kpn(path.parent, source_segmenter(rd, cfg, sets), device=cfg.get("device", "auto"))


def register(subparsers) -> None:
    p = subparsers.add_parser("kpn-train", help="train the DA-KPN translator and write its translated source set")
    p.add_argument("--profile", default="demo")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<profile>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=None, help="override kpn_iters of the profile")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing checkpoints")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = runs.load_config(args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device)
    if args.iters is not None:
        cfg.nb["kpn_iters"] = args.iters
    runs.set_threads()
    res = run(cfg, resume=not args.no_resume)
    t = res["translation"]
    print(f"DA-KPN: {len(res['history'])} steps in {res['out_dir']}; translated {t['n_images']} images "
          f"({t['seconds_per_image'] * 1e3:.2f} ms/image) into {runs.RunDir(cfg.run_dir).translated(METHOD)}")
    return 0
