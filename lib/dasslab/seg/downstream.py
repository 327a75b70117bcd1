"""Cached segmenters and the downstream evaluation every method is scored by.

A translation is judged by the target mIoU of a segmenter trained on it. Notebooks 01-05 train
their own rows and notebook 06 gathers them, so training and scores are cached in the run
directory, keyed by a fingerprint of everything that changes the result (model, training budget,
seed, training sets, evaluation set): a second call with the same inputs reuses, a changed input
retrains.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dasslab import runs

from .infer import evaluate, load_segmenter, save_segmenter
from .models import build_segmenter
from .train import TrainConfig, as_dataset, train_segmenter

#: ``[seg]`` keys that are not TrainConfig fields
PROFILE_KEYS = ("model", "model_kwargs", "seeds", "reference_seed", "eval_batch_size")


def train_config(cfg, seed: int | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of the profile's ``[seg]`` table (``seed`` and ``overrides`` win)."""
    table = dict(cfg.seg)
    valid = set(TrainConfig.fields()) | set(PROFILE_KEYS)
    unknown = sorted(set(table) - valid)
    if unknown:
        raise KeyError(
            f"[seg] table of profile {cfg.get('profile')!r} has unknown keys {unknown}; valid: {sorted(valid)}"
        )
    kw = {k: v for k, v in table.items() if k in TrainConfig.fields()}
    if seed is not None:
        kw["seed"] = seed
    kw.update(overrides)
    return TrainConfig(**kw)


def model_spec(cfg) -> dict:
    return {"name": cfg.seg.get("model", "unet-small"), "kwargs": dict(cfg.seg.get("model_kwargs", {}) or {})}


def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(ds) -> dict:
    """What identifies a dataset's content cheaply: class, root, split settings, item names and a
    translation record (``translation.json``) when the folder has one."""
    if isinstance(ds, (list, tuple)):
        return {"concat": [dataset_fingerprint(d) for d in ds]}
    fp = getattr(ds, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if fp is not None:
        return {"fingerprint": fp}
    if isinstance(ds, torch.utils.data.ConcatDataset):
        return {"concat": [dataset_fingerprint(d) for d in ds.datasets]}
    out = {"type": type(ds).__name__, "len": len(ds)}
    for attr in ("root", "preset", "split", "condition", "size"):
        v = getattr(ds, attr, None)
        if v is not None:
            out[attr] = str(v) if isinstance(v, Path) else v
    names = getattr(ds, "names", None)
    if names is not None:
        out["names"] = _sha(list(names))
    root = getattr(ds, "root", None)
    if root is not None and (Path(root) / "translation.json").is_file():
        out["translation"] = hashlib.sha1((Path(root) / "translation.json").read_bytes()).hexdigest()
    if names is None and root is None:
        # an in-memory set: hash its content
        h = hashlib.sha1()
        for i in range(len(ds)):
            for k, v in sorted(ds[i].items()):
                if isinstance(v, torch.Tensor):
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
                else:
                    h.update(repr(v).encode())
        out["content"] = h.hexdigest()
    return out


def callable_name(fn) -> str | None:
    """A stable name for a loss function: qualname for functions, the class for callable objects,
    the wrapped function and arguments for ``functools.partial`` (settings belong in
    ``fingerprint_extra``)."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    qn = getattr(fn, "__qualname__", None)
    if qn is None:
        qn = type(fn).__qualname__
    return f"{getattr(fn, '__module__', type(fn).__module__)}.{qn}"


def weights_hash(model) -> str:
    """SHA-1 of a model's state dict (names and values)."""
    return _weights_hash(model)


def _weights_hash(model) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def get_or_train(
    rd,
    name: str,
    train_sets,
    cfg,
    seed: int | None = None,
    loss_fn=None,
    init=None,
    fingerprint_extra=None,
    tc: TrainConfig | None = None,
    device=None,
):
    """A segmenter trained on ``train_sets`` with the profile's ``[seg]`` budget, cached under
    ``rd.segmenter_dir(name)``.

    The cache holds the weights and a fingerprint of (model, TrainConfig, seed, training sets,
    ``loss_fn`` name, ``fingerprint_extra``, and the weights of ``init`` when fine-tuning from a given
    model). Same fingerprint: loaded, not retrained. Different: retrained in place. An interrupted
    training resumes from its checkpoints.
    """
    tc = tc or train_config(cfg, seed=seed if seed is not None else cfg.seg.get("seeds", [0])[0])
    spec = (
        model_spec(cfg)
        if init is None
        else {"name": init.seg_config["name"], "kwargs": init.seg_config["kwargs"]}
    )
    ident = {
        "model": spec,
        "train": tc.identity(),
        "data": dataset_fingerprint(
            list(train_sets) if isinstance(train_sets, (list, tuple)) else train_sets
        ),
        "loss_fn": callable_name(loss_fn),
        "extra": fingerprint_extra,
        "init": _weights_hash(init) if init is not None else None,
    }
    fp = _sha(ident)
    out = Path(rd.segmenter_dir(name))
    dev = runs.pick_device(device or cfg.get("device", "auto"))
    if _saved_fingerprint(out) == fp:
        return load_segmenter(out, device=dev)
    # the same training under another name (e.g. a notebook's view of a baseline): copy, don't retrain
    for other in sorted(out.parent.glob("*/config.json")) if out.parent.is_dir() else []:
        if other.parent != out and _saved_fingerprint(other.parent) == fp:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").unlink(missing_ok=True)
            for fname in ("model.safetensors", "history.csv", "config.json"):
                if (other.parent / fname).is_file():
                    with runs.atomic_path(out / fname) as tmp:
                        shutil.copyfile(other.parent / fname, tmp)
            return load_segmenter(out, device=dev)
    # stale weights must never pair with a config that claims another fingerprint
    (out / "config.json").unlink(missing_ok=True)
    ckpt_dir = out / f"train-{fp[:12]}"
    for stale in out.glob("train-*"):
        if stale != ckpt_dir:
            shutil.rmtree(stale, ignore_errors=True)
    runs.seed_everything(tc.seed)
    if init is not None:
        model = build_segmenter(spec["name"], init.seg_config["num_classes"], **spec["kwargs"])
        model.load_state_dict(init.state_dict())
    else:
        model = build_segmenter(spec["name"], 19, **spec["kwargs"])
    t0 = time.perf_counter()
    model, hist = train_segmenter(
        model, train_sets, tc, out_dir=ckpt_dir, device=dev, loss_fn=loss_fn, desc=f"train {name}"
    )
    seconds = time.perf_counter() - t0
    save_segmenter(
        model,
        out,
        meta={
            "fingerprint": fp,
            "identity": ident,
            "train_seconds": seconds,
            "final_loss": float(hist["loss"].tail(20).mean()) if len(hist) else None,
        },
    )
    with runs.atomic_write(out / "history.csv", "w") as f:
        hist.to_csv(f, index=False)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return model.eval()


def _saved_fingerprint(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("meta", {}).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def reference_segmenter(rd, cfg, sets=None, device=None):
    """The target-trained segmenter for label consistency (target TRAIN labels, fixed seed).

    It is the oracle's model of that seed (same data, budget and seed), cached under the name
    notebook 06's oracle row uses, so the run trains it once."""
    if sets is None:
        from dasslab import datasets

        sets = datasets.benchmark_sets(cfg)
    seed = cfg.seg.get("reference_seed", 0)
    return get_or_train(rd, f"oracle-seed{seed}", [sets["target_train"]], cfg, seed=seed, device=device)


def _eval_key(method, train_sets, eval_set, eval_name, cfg, tc, loss_fn, extra) -> str:
    return _sha(
        {
            "method": method,
            "train": dataset_fingerprint(list(train_sets)),
            "eval": dataset_fingerprint(eval_set),
            "eval_name": eval_name,
            "model": model_spec(cfg),
            "tc": tc.identity(),
            "loss_fn": callable_name(loss_fn),
            "extra": extra,
        }
    )


def evaluation_dir(rd) -> Path:
    return Path(rd.artifacts) / "evaluations"


def train_and_evaluate(
    method: str,
    train_sets,
    eval_set,
    cfg,
    seeds=None,
    rd=None,
    eval_name: str = "target_val",
    loss_fn=None,
    fingerprint_extra=None,
    device=None,
) -> pd.DataFrame:
    """Trains one segmenter per seed on ``train_sets`` and scores it on ``eval_set``.

    Returns a tidy table (method, eval_set, seed, class, IoU in percent) with one extra row per seed
    whose class is ``"mIoU"``. Each (method, data, config, seed) result is cached as JSON under
    ``rd.artifacts/evaluations/<method>/`` and the segmenter under ``segmenters/<method>-seed<k>``.
    """
    rd = rd or runs.RunDir(cfg.run_dir)
    seeds = list(cfg.seg.get("seeds", [0]) if seeds is None else seeds)
    if not isinstance(train_sets, (list, tuple)):
        train_sets = [train_sets]
    if len(as_dataset(list(train_sets))) == 0:
        raise ValueError(f"{method}: the training sets are empty")
    rows = []
    for seed in seeds:
        tc = train_config(cfg, seed=seed)
        key = _eval_key(method, train_sets, eval_set, eval_name, cfg, tc, loss_fn, fingerprint_extra)
        path = evaluation_dir(rd) / _slug(method) / f"{_slug(eval_name)}-seed{seed}-{key[:16]}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            model = get_or_train(
                rd,
                f"{_slug(method)}-seed{seed}",
                train_sets,
                cfg,
                seed=seed,
                loss_fn=loss_fn,
                fingerprint_extra=fingerprint_extra,
                tc=tc,
                device=device,
            )
            res = evaluate(
                model,
                eval_set,
                batch_size=cfg.seg.get("eval_batch_size", 16),
                desc=f"evaluate {method} on {eval_name}",
                num_workers=tc.num_workers,
            )
            rec = {
                "method": method,
                "eval_set": eval_name,
                "seed": seed,
                "key": key,
                "mIoU": res["mIoU"],
                "mIoU16": res.get("mIoU16"),
                "mIoU13": res.get("mIoU13"),
                "acc": res["acc"],
                "per_class": res["per_class"],
                "confusion": res["confusion"],
                "seconds": time.perf_counter() - t0,
            }
            runs.atomic_save_json(path, rec)
            # one record per (method, evaluation set, seed): the newest settings replace older ones
            for stale in path.parent.glob(f"{_slug(eval_name)}-seed{seed}-*.json"):
                if stale != path:
                    stale.unlink(missing_ok=True)
        rows.extend(_tidy(rec))
    return pd.DataFrame(rows, columns=["method", "eval_set", "seed", "class", "IoU"])


def _tidy(rec: dict) -> list[tuple]:
    rows = [
        (rec["method"], rec["eval_set"], rec["seed"], cls, np.nan if iou is None else float(iou))
        for cls, iou in rec["per_class"].items()
    ]
    rows.append(
        (
            rec["method"],
            rec["eval_set"],
            rec["seed"],
            "mIoU",
            np.nan if rec["mIoU"] is None else float(rec["mIoU"]),
        )
    )
    return rows


def results_table(rd, methods=None, eval_set: str | None = None) -> pd.DataFrame:
    """The tidy table of every cached :func:`train_and_evaluate` result in a run (no training), so a
    later notebook gathers the rows earlier ones produced, whatever loss or settings made them."""
    rows = []
    for p in sorted(evaluation_dir(rd).rglob("*.json")):
        rec = json.loads(p.read_text())
        if (methods is None or rec["method"] in methods) and (
            eval_set is None or rec["eval_set"] == eval_set
        ):
            rows.extend(_tidy(rec))
    return pd.DataFrame(rows, columns=["method", "eval_set", "seed", "class", "IoU"])


def cached_evaluations(rd) -> pd.DataFrame:
    """Every cached evaluation record of a run as rows (method, eval_set, seed, mIoU, acc, path)."""
    recs = []
    for p in sorted(evaluation_dir(rd).rglob("*.json")):
        r = json.loads(p.read_text())
        recs.append(
            {
                "method": r["method"],
                "eval_set": r["eval_set"],
                "seed": r["seed"],
                "mIoU": r["mIoU"],
                "acc": r["acc"],
                "path": p,
            }
        )
    return pd.DataFrame(recs, columns=["method", "eval_set", "seed", "mIoU", "acc", "path"])


def confusion_of(rd, method: str, eval_name: str = "target_val") -> np.ndarray:
    """The summed (over seeds) confusion matrix of a cached evaluation, rows = ground truth."""
    mats = [
        np.asarray(json.loads(p.read_text())["confusion"])
        for p in sorted((evaluation_dir(rd) / _slug(method)).glob(f"{_slug(eval_name)}-seed*.json"))
    ]
    if not mats:
        raise FileNotFoundError(
            f"no cached evaluation of {method!r} on {eval_name!r} in {evaluation_dir(rd)}"
        )
    return np.sum(mats, axis=0)


def baselines(rd, cfg, sets=None, seeds=None, eval_sets=("target_val",), device=None) -> pd.DataFrame:
    """Source-only (train on source_train) and oracle (train on the evaluation domain's train split)
    rows, scored on each named evaluation set (``target_val``, or ``<condition>_val``)."""
    if sets is None:
        from dasslab import datasets

        sets = datasets.benchmark_sets(cfg)
    tables = []
    for ev in eval_sets:
        if ev not in sets:
            raise KeyError(f"evaluation set {ev!r} not among the benchmark sets {sorted(sets)}")
        tables.append(
            train_and_evaluate(
                "source_only", [sets["source_train"]], sets[ev], cfg, seeds, rd, eval_name=ev, device=device
            )
        )
        train_name = ev[: -len("_val")] + "_train" if ev.endswith("_val") else None
        if train_name not in sets:
            raise KeyError(f"no training split {train_name!r} for the oracle on {ev!r}")
        tables.append(
            train_and_evaluate(
                "oracle", [sets[train_name]], sets[ev], cfg, seeds, rd, eval_name=ev, device=device
            )
        )
    return pd.concat(tables, ignore_index=True)


def summarize(table: pd.DataFrame, source="source_only", oracle="oracle") -> pd.DataFrame:
    """Per method (and evaluation set): mean and std (over seeds) of mIoU, gain over source-only and
    the share of the source_only -> oracle gap closed (when both rows are in the table)."""
    m = table[table["class"] == "mIoU"]
    keys = ["eval_set", "method"] if "eval_set" in m.columns else ["method"]
    g = m.groupby(keys, sort=False)["IoU"]
    out = pd.DataFrame(
        {"mIoU": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n_seeds": g.count()}
    ).reset_index()
    out["gain"] = np.nan
    out["gap_closed"] = np.nan
    groups = out.groupby("eval_set", sort=False) if "eval_set" in out.columns else [(None, out)]
    for _, grp in groups:
        src = grp.loc[grp["method"] == source, "mIoU"]
        orc = grp.loc[grp["method"] == oracle, "mIoU"]
        if len(src):
            out.loc[grp.index, "gain"] = grp["mIoU"] - float(src.iloc[0])
            if len(orc) and float(orc.iloc[0]) != float(src.iloc[0]):
                out.loc[grp.index, "gap_closed"] = (grp["mIoU"] - float(src.iloc[0])) / (
                    float(orc.iloc[0]) - float(src.iloc[0])
                )
    return out
