"""The zero-shot protocol: transfer the source set per prompt, adapt, score on each adverse val split.

Source = day images with labels (ToyStreets: the camera-look Cityscapes-layout train split; paper:
Cityscapes train). Each adverse condition is named only by a prompt. Four rows per condition, each
over the profile's seeds and one fixed training schedule (no model selection on target images):

- ``source-only``: CE on the source images;
- ``transfer``: CE on source + CE on transferred images (same labels);
- ``zodi``: transfer + feature similarity (full ZoDi);
- ``oracle``: CE on that condition's own train split with labels (an upper reference, not zero-shot).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pandas as pd
import torch

from dasslab import runs
from dasslab.zeroshot.adapt import PairedDataset, ZoDiLoss
from dasslab.zeroshot.backends import TransferBackend

FORMAT = "dasslab-translated-v1"


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.stack([it["label"] for it in items]),
            "name": [it["name"] for it in items]}


def _source_id(source) -> dict:
    from dasslab.seg import dataset_fingerprint

    return dataset_fingerprint(source)


def transfer_set(backend: TransferBackend, source, out_dir: str | Path, prompt: str, strength: float, *,
                 condition: str | None = None, seed: int = 42, batch_size: int = 32, progress: bool = True):
    """Writes ``source`` transferred under ``prompt`` into ``out_dir`` (GTA5 layout, source labels).

    Returns the transferred set as a ``SegFolder`` (same size as the source items). A finished folder
    whose ``translation.json`` records the same settings is reused; an interrupted one resumes
    (each batch draws its noise from ``seed`` and the batch's first index, so redoing it is exact).
    """
    from dasslab import datasets

    if not prompt or not isinstance(prompt, str):
        raise ValueError(f"transfer_set: prompt must be a non-empty string, got {prompt!r}")
    out_dir = Path(out_dir)
    params = {"format": FORMAT, "method": "zodi", "condition": condition, "prompt": prompt,
              "strength": float(strength), "seed": int(seed), "batch_size": int(batch_size),
              "backend": backend.settings(), "source": _source_id(source), "n": len(source)}
    final, partial = out_dir / "translation.json", out_dir / ".translation.partial.json"
    if final.is_file():
        done = json.loads(final.read_text())
        if done.get("params") == json.loads(json.dumps(params)):
            return datasets.SegFolder(out_dir, "gta5")
        final.unlink()
    resume = partial.is_file() and json.loads(partial.read_text()) == json.loads(json.dumps(params))
    if not resume:
        for sub in ("images", "labels"):
            for p in (out_dir / sub).glob("*.png") if (out_dir / sub).is_dir() else []:
                p.unlink()
        runs.atomic_save_json(partial, params)
    names = list(source.names)
    t0, n_done = time.perf_counter(), 0
    bar = runs.progress(total=len(names), desc=f"transfer {condition or prompt!r}",
                        **({} if progress else {"disable": True}))
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        bar.update(len(chunk))
        if resume and all((out_dir / "images" / f"{n}.png").is_file() and
                          (out_dir / "labels" / f"{n}.png").is_file() for n in chunk):
            continue
        batch = _collate([source[i] for i in range(start, start + len(chunk))])
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + start)
        out = backend.transfer(batch["image"], batch["label"], prompt, strength, g)
        datasets.write_translated(out_dir, batch["name"], out.cpu(), batch["label"])
        n_done += len(chunk)
    bar.close()
    sec = time.perf_counter() - t0
    runs.atomic_save_json(final, {"method": "zodi", "params": params,
                                  "sec_per_image": sec / max(1, n_done), "n_generated_now": n_done})
    partial.unlink(missing_ok=True)
    return datasets.SegFolder(out_dir, "gta5")


def seg_config(cfg, **overrides):
    """A copy of ``cfg`` whose ``[seg]`` table has ``overrides`` (values None or 0 keep the profile's)."""
    out = copy.deepcopy(cfg)
    for k, v in overrides.items():
        if v not in (None, 0, [], ""):
            out.seg[k] = v
    return out


def source_set(sets: dict, cfg) -> object:
    """The labelled day set ZoDi starts from: ToyStreets' camera train split, else source_train."""
    key = cfg.nb.get("source_set") or ("target_train" if cfg.data.get("dataset") == "toystreets" else "source_train")
    if key not in sets:
        raise KeyError(f"source_set {key!r} is not among the benchmark sets {sorted(sets)}")
    return sets[key]


def evaluate_condition(rd, cfg, sets: dict, condition: str, transferred, *, variants=("source-only", "transfer",
                       "zodi", "oracle"), seeds=None, lambda_sim: float = 0.1, source=None,
                       device=None) -> pd.DataFrame:
    """Tidy rows (method, eval_set, seed, class, IoU) for one adverse condition's val split.

    The split is ``<condition>_val`` unless the notebook table maps it (``eval_sets``; e.g. ZoDi's
    Cityscapes -> GTA5 "game" target scores on ``source_val``), likewise the oracle's ``oracle_sets``.

    Cached through ``seg.train_and_evaluate`` (a rerun with the same data and settings reads JSON).
    ``transferred`` is that condition's transferred set (ignored for source-only and oracle).
    """
    from dasslab import seg

    nb = cfg.get("nb", {}) or {}
    val_key = (nb.get("eval_sets") or {}).get(condition, f"{condition}_val")
    train_key = (nb.get("oracle_sets") or {}).get(condition, f"{condition}_train")
    if val_key not in sets:
        raise KeyError(f"no evaluation split {val_key!r} among {sorted(sets)}")
    source = source if source is not None else source_set(sets, cfg)
    tables = []
    for v in variants:
        if v == "source-only":
            t = seg.train_and_evaluate("zodi-source-only", [source], sets[val_key], cfg, seeds, rd,
                                       eval_name=val_key, loss_fn=ZoDiLoss("source-only"), device=device)
        elif v in ("transfer", "zodi"):
            loss = ZoDiLoss(v, lambda_sim)
            t = seg.train_and_evaluate(f"zodi-{v}-{condition}", [PairedDataset(source, transferred)],
                                       sets[val_key], cfg, seeds, rd, eval_name=val_key, loss_fn=loss,
                                       fingerprint_extra=loss.settings(), device=device)
        elif v == "oracle":
            if train_key not in sets:
                raise KeyError(f"no training split {train_key!r} for the {condition} oracle")
            t = seg.train_and_evaluate(f"oracle-{condition}", [sets[train_key]], sets[val_key], cfg, seeds, rd,
                                       eval_name=val_key, device=device)
        else:
            raise ValueError(f"unknown variant {v!r}; use source-only, transfer, zodi, oracle")
        t = t.assign(method=v, condition=condition)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per condition and method: mIoU mean, std over seeds, gain over source-only, n seeds."""
    m = table[table["class"] == "mIoU"]
    g = m.groupby(["condition", "method"], sort=False)["IoU"]
    out = pd.DataFrame({"mIoU": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n_seeds": g.count()}).reset_index()
    base = out[out["method"] == "source-only"].set_index("condition")["mIoU"]
    out["gain"] = out["mIoU"] - out["condition"].map(base)
    return out


def beats(summary: pd.DataFrame, condition: str, method: str = "zodi", baseline: str = "source-only") -> bool:
    """``method`` beats ``baseline`` on ``condition`` by more than the larger of their seed spreads."""
    s = summary.set_index(["condition", "method"])
    a, b = s.loc[(condition, method)], s.loc[(condition, baseline)]
    return bool(a["mIoU"] - b["mIoU"] > max(a["std"], b["std"]))
