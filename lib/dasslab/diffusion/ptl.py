"""Progressive Translation Learning (PTL, Peng et al., ICCV 2023): cross a large gap in steps.

SGG's guide is trained on source images; on target-looking samples it misreads the scene and its
gradients point the wrong way, exactly where guidance matters. PTL walks through intermediate
domains: depths K_1 < ... < K_S (as strengths K/T), g_0 = the source-trained guide, and for stage s

1. translate the source set with SGG at depth K_s guided by g_{s-1};
2. fine-tune g_{s-1} on those translations (source labels) plus the source images -> g_s
   (``seg.get_or_train`` -> ``seg.train_segmenter``: the one training loop, a new checkpoint per stage).

Each stage lives in ``<root>/stage<s>/`` (``translated/``, the guide under
``rd.segmenter_dir("ptl-guide-stage<s>")``, ``stage.json`` written last); a stage whose record matches
its inputs (settings and the previous stage) is loaded, not recomputed, so an interrupted run resumes
at the first unfinished stage. Per stage it records how the guide reads images it did NOT guide:
unguided SDEdit translations of source val at the next depth and target val (its score on its own
guided outputs proves nothing: guidance writes what the guide wants to read).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dasslab import runs
from dasslab.diffusion import sgg

NOTEBOOK = "03_progressive_translation"
STAGE_RECORD = "stage.json"


def check_depths(strengths: Sequence[float]) -> list[float]:
    """The PTL schedule as floats; strictly increasing depths in (0, 1], else a ValueError."""
    vals = [float(s) for s in strengths]
    if not vals:
        raise ValueError("PTL needs at least one stage depth (strengths=[])")
    bad = [s for s in vals if not 0.0 < s <= 1.0]
    if bad:
        raise ValueError(f"PTL depths must lie in (0, 1] (strength = K/T); got {bad}")
    for a, b in itertools.pairwise(vals):
        if not b > a:
            raise ValueError(
                f"PTL depths must be strictly increasing (K_1 < K_2 < ...): got {vals} "
                f"({b} does not exceed {a})"
            )
    return vals


def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(runs.to_jsonable(obj), sort_keys=True).encode()).hexdigest()


@dataclass
class PTLResult:
    """What a PTL run produced: one record per stage (in order) and the final guide and set."""

    stages: list[dict] = field(default_factory=list)
    guides: list = field(default_factory=list)  # g_1 .. g_S (g_0 is the caller's)
    final_dir: Path | None = None

    def table(self):
        """Stage records as a pandas table (one row per stage)."""
        import pandas as pd

        rows = []
        for r in self.stages:
            row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
            row.update(
                {f"{k}": v for k, v in (r.get("metrics") or {}).items() if not isinstance(v, (dict, list))}
            )
            rows.append(row)
        return pd.DataFrame(rows)


def _guide_id(model) -> str:
    from dasslab.seg.downstream import _weights_hash

    return _weights_hash(model)


def evaluate_stage(
    guide, translated, ref=None, target_images=None, sdedit_next=None, target_val=None, batch_size: int = 32
) -> dict:
    """The stage's numbers: label consistency of ``ref`` (a target-trained segmenter, NOT the guide) on
    the translated set, domain distance to ``target_images``, and the guide's mIoU on sets it did not
    guide (``sdedit_next``: unguided translations at the next depth; ``target_val``)."""
    from dasslab import metrics, seg

    out = {}
    if ref is not None:
        out["label_consistency"] = metrics.label_consistency(ref, translated, batch_size=batch_size)
    if target_images is not None:
        out["kid_to_target"] = metrics.domain_distance(translated, target_images)["kid"]
    if sdedit_next is not None:
        out["guide_miou_sdedit_next"] = seg.evaluate(guide, sdedit_next, batch_size=batch_size)["mIoU"]
    if target_val is not None:
        out["guide_miou_target_val"] = seg.evaluate(guide, target_val, batch_size=batch_size)["mIoU"]
    return out


def run_ptl(
    rd,
    unet,
    scheduler,
    guide0,
    source_set,
    strengths: Sequence[float],
    sgg_cfg: sgg.SGGConfig,
    finetune_tc,
    cfg=None,
    root=None,
    loss_fn=None,
    loss_extra=None,
    seed: int = 0,
    batch_size: int = 16,
    include_source: bool = True,
    final_dir=None,
    eval_fn=None,
    stage_limit: int | None = None,
    name: str = "ptl",
    progress: bool = True,
    device=None,
    finetune_last: bool = True,
) -> PTLResult:
    """Runs (or resumes) the PTL stages; see the module docstring.

    ``guide0``: the source-trained guide g_0 (a ``seg.build_segmenter`` model). ``sgg_cfg``: the SGG
    setting (its ``strength`` is replaced by each stage's depth). ``finetune_tc``: the ``seg.TrainConfig``
    of each fine-tuning (``loss_fn`` / ``loss_extra``: the guide's loss, e.g. ``sgg.NoisyCE`` for a
    noise-aware guide). ``eval_fn(stage_index, guide, translated_set) -> dict`` adds numbers to each
    stage record (see :func:`evaluate_stage`). ``stage_limit``: intermediate stages (s < S) translate
    only the first n source images (they exist to fine-tune the guide); the last stage translates all.
    ``final_dir``: where the last stage's set is copied
    (``rd.translated("sgg_ptl")``). ``finetune_last=False`` stops after the last stage's translation
    (its guide would guide nothing more; an ablation that only scores the final set saves that
    fine-tuning): ``guides`` then ends with g_{S-1}. Returns a :class:`PTLResult`.
    """
    from dasslab import datasets, seg

    depths = check_depths(strengths)
    root = Path(root) if root is not None else Path(rd.artifacts) / name
    root.mkdir(parents=True, exist_ok=True)
    from dasslab.diffusion import sdedit

    model_fp = sdedit.model_fingerprint(unet)
    cfg = cfg if cfg is not None else runs.Config.wrap({"device": device or "auto", "seg": {}})
    guide = guide0
    prev_key = _sha({"g0": _guide_id(guide0)})
    result = PTLResult()
    for s, depth in enumerate(depths, start=1):
        stage_dir = root / f"stage{s}"
        cfg_s = sgg_cfg.replace(strength=depth)
        key = _sha(
            {
                "prev": prev_key,
                "depth": depth,
                "sgg": cfg_s.to_dict(),
                "tc": finetune_tc.identity(),
                "loss": loss_extra,
                "source": seg.dataset_fingerprint(source_set),
                "model": model_fp,
                "seed": seed,
                "include_source": include_source,
                "limit": stage_limit if s < len(depths) else None,
                **({} if finetune_last or s < len(depths) else {"finetune": False}),
            }
        )
        tune = finetune_last or s < len(depths)
        rec_path = stage_dir / STAGE_RECORD
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        seg_name = f"{name}-guide-stage{s}"
        if rec.get("key") == key and (
            not tune or (Path(rd.segmenter_dir(seg_name)) / "model.safetensors").is_file()
        ):
            if tune:
                guide = seg.load_segmenter(rd.segmenter_dir(seg_name), device=device)
            rec["resumed"] = True
        else:
            rec_path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            guide_dev = guide.to(next(unet.parameters()).device)
            tr = sgg.translate_dataset_sgg(
                unet,
                scheduler,
                guide_dev,
                source_set,
                stage_dir / "translated",
                cfg_s,
                seed=seed,
                batch_size=batch_size,
                method=f"{name}-stage{s}",
                limit=stage_limit if s < len(depths) else None,
                extra={"guide": _guide_id(guide), "stage": s},
                progress=progress,
            )
            t_translate = time.perf_counter() - t0
            translated = datasets.SegFolder(stage_dir / "translated", "gta5")
            train_sets = [translated, source_set] if include_source else [translated]
            t0 = time.perf_counter()
            if tune:
                guide = seg.get_or_train(
                    rd,
                    seg_name,
                    train_sets,
                    cfg,
                    loss_fn=loss_fn,
                    init=guide,
                    fingerprint_extra={"ptl_key": key, "loss": loss_extra},
                    tc=finetune_tc,
                    device=device,
                )
            t_tune = time.perf_counter() - t0
            rec = {
                "stage": s,
                "depth": depth,
                "key": key,
                "prev_key": prev_key,
                "translated": str(stage_dir / "translated"),
                "guide_dir": str(rd.segmenter_dir(seg_name)) if tune else None,
                "guide_id": _guide_id(guide) if tune else None,
                "sec_per_image": tr.get("seconds_per_image"),
                "seconds_translate": t_translate,
                "seconds_finetune": t_tune,
                "metrics": {},
            }
            if eval_fn is not None:
                rec["metrics"] = eval_fn(s, guide, translated)
            runs.atomic_save_json(rec_path, rec)
            rec["resumed"] = False
        result.stages.append(rec)
        if tune:
            result.guides.append(guide)
        prev_key = key
    if final_dir is not None:
        result.final_dir = _publish(
            root / f"stage{len(depths)}" / "translated",
            Path(final_dir),
            {"method": "sgg_ptl", "stages": depths, "final_key": prev_key},
        )
    return result


def _publish(src: Path, dst: Path, info: dict) -> Path:
    """Copy the last stage's set to ``dst`` (temp folder, then rename; skipped when already there)."""
    rec_dst = dst / "translation.json"
    if (
        rec_dst.is_file()
        and json.loads(rec_dst.read_text()).get("ptl", {}).get("final_key") == info["final_key"]
    ):
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    rec = json.loads((tmp / "translation.json").read_text())
    rec.update({"method": info["method"], "ptl": info})
    runs.atomic_save_json(tmp / "translation.json", rec)
    (tmp / ".translation-params.json").unlink(missing_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


# --------------------------------------------------------------------------------------------------
# run level (notebook 03 and the CLI)
# --------------------------------------------------------------------------------------------------
@dataclass
class Chapter02:
    """What PTL takes from chapter 02: its SGG setting, its guide g_0 and the loss that trained it."""

    sgg: sgg.SGGConfig
    guide0: object
    loss_fn: object
    loss_extra: dict
    guide: dict
    seed: int
    batch_size: int


def from_chapter02(rd, scheduler, device=None) -> Chapter02:
    """The SGG setting and source guide notebook 02 recorded in ``metrics/02_*.json`` (a clear error
    names the notebook to run when it has not run), with the guide's training loss for the stage
    fine-tunings: the same colour jitter and adversarial training g_0 had, so each g_s stays as robust."""
    from dasslab import seg

    m02 = rd.read_metrics(sgg.NOTEBOOK)
    G = m02["guide"]
    g0 = seg.load_segmenter(rd.require(G["segmenter_dir"], producer=sgg.NOTEBOOK), device=device)
    loss_fn, extra = sgg.guide_loss(
        G["input"],
        scheduler,
        G["t_max"],
        float(G.get("photometric", 0.0)),
        float(G.get("adv_eps", 0.0)),
        int(G.get("adv_steps", 3)),
    )
    return Chapter02(
        sgg.SGGConfig(**m02["settings"]), g0, loss_fn, extra, G, int(m02["seed"]), int(m02["batch_size"])
    )


def finetune_config(cfg, seed: int = 0):
    """Fine-tuning budget of one stage: the profile's [seg] table with ``finetune_iters`` / ``finetune_lr``."""
    from dasslab import seg

    nb = cfg.nb
    kw = {}
    if nb.get("finetune_iters"):
        kw["iters"] = int(nb["finetune_iters"])
    if nb.get("finetune_lr"):
        kw["lr"] = float(nb["finetune_lr"])
    return seg.train_config(cfg, seed=seed, **kw)


def guide_eval_fn(
    rd,
    cfg,
    unet,
    scheduler,
    sets,
    depths: Sequence[float],
    sgg_cfg: sgg.SGGConfig,
    ref=None,
    n_eval: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    root=None,
):
    """An ``eval_fn`` for :func:`run_ptl`: label consistency (reference segmenter), domain distance to
    target train, and the stage guide's mIoU on unguided SDEdit translations of source val at the NEXT
    depth (the deepest for the last stage) and on target val."""

    root = Path(root) if root is not None else Path(rd.artifacts) / "ptl" / "sdedit_eval"
    target_images = sets["target_train"]
    target_val = sets["target_val"]

    def fn(s: int, guide, translated):
        nxt = depths[min(s, len(depths) - 1)]
        sd = sdedit_eval_set(
            unet, scheduler, sets["source_val"], nxt, sgg_cfg, root, n_eval, seed, batch_size, progress
        )
        m = evaluate_stage(
            guide,
            translated,
            ref=ref,
            target_images=target_images,
            sdedit_next=sd,
            target_val=target_val,
            batch_size=batch_size,
        )
        m["next_depth"] = nxt
        return m

    return fn


def sdedit_eval_set(
    unet,
    scheduler,
    source_val,
    strength: float,
    sgg_cfg: sgg.SGGConfig,
    root,
    n: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
):
    """Unguided SDEdit translations of (the first ``n`` of) source val at ``strength``, cached under
    ``root/s<strength>``, as a SegFolder: images no guide wrote."""
    from dasslab import datasets
    from dasslab.diffusion import sdedit

    out = Path(root) / f"s{strength:.3f}"
    sdedit.translate_dataset(
        unet,
        scheduler,
        source_val,
        out,
        strength,
        batch_size=batch_size,
        seed=seed,
        steps=sgg_cfg.num_steps,
        sampler=sgg_cfg.sampler,
        eta=sgg_cfg.eta,
        method="sdedit-eval",
        limit=n or None,
        progress=progress,
    )
    return datasets.SegFolder(out, "gta5")


def _cmd_ptl(args) -> int:
    from dasslab import datasets, seg
    from dasslab.diffusion import ddpm

    cfg = runs.load_config(
        args.profile, notebook=NOTEBOOK, run_dir=args.run_dir, device=args.device, data_root=args.data_root
    )
    runs.set_threads()
    rd = runs.RunDir(cfg.run_dir)
    nb = cfg.nb
    depths = check_depths(args.strengths if args.strengths else nb.get("strengths"))
    sets = datasets.benchmark_sets(cfg)
    pipe = ddpm.load_ddpm(rd.require(ddpm.ddpm_dir(rd), producer=ddpm.NOTEBOOK), device=cfg.device)
    src = datasets.benchmark_sets(cfg, size=tuple(pipe.unet.config.sample_size))  # at the DDPM's size
    ch02 = from_chapter02(rd, pipe.scheduler, device=cfg.device)  # the guide and setting of notebook 02
    sgg_cfg, g0 = ch02.sgg.replace(strength=depths[-1]), ch02.guide0
    loss_fn, extra = ch02.loss_fn, ch02.loss_extra
    ref = seg.reference_segmenter(rd, cfg, sets) if not args.no_eval else None
    seed = ch02.seed
    eval_fn = (
        None
        if args.no_eval
        else guide_eval_fn(
            rd,
            cfg,
            pipe.unet,
            pipe.scheduler,
            {**sets, "source_val": src["source_val"]},
            depths,
            sgg_cfg,
            ref=ref,
            n_eval=int(nb.get("n_eval", 0) or 0),
            seed=seed,
        )
    )
    res = run_ptl(
        rd,
        pipe.unet,
        pipe.scheduler,
        g0,
        src["source_train"],
        depths,
        sgg_cfg,
        finetune_config(cfg, seed),
        loss_fn=loss_fn,
        loss_extra=extra,
        seed=seed,
        batch_size=ch02.batch_size,
        cfg=cfg,
        stage_limit=int(nb.get("stage_n", 0) or 0) or None,
        final_dir=rd.translated("sgg_ptl"),
        eval_fn=eval_fn,
    )
    print(res.table().to_string(index=False))
    print(f"final PTL set: {res.final_dir}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ptl",
        help="progressive translation learning: SGG in stages of increasing depth (notebook 03's set)",
        description="Runs (or resumes) PTL over the run's source_train set: SGG at each depth guided by the "
        "previous stage's guide, which is then fine-tuned on the stage's translations. The final "
        f"set goes to artifacts/translated/sgg_ptl. Stages: the profile's [{NOTEBOOK}] table; the SGG "
        "setting and g_0: what notebook 02 recorded in the run (run it first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--profile", default="demo", help="profile name or .toml path")
    p.add_argument("--run-dir", required=True, help="run directory holding artifacts/ddpm (notebook 01)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", default=None, help="dataset root (default: the profile's)")
    p.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=None,
        help="stage depths K_s/T, strictly increasing (default: the profile's)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the per-stage evaluations")
    p.set_defaults(func=_cmd_ptl)


__all__ = [
    "Chapter02",
    "PTLResult",
    "check_depths",
    "evaluate_stage",
    "finetune_config",
    "from_chapter02",
    "guide_eval_fn",
    "register",
    "run_ptl",
    "sdedit_eval_set",
]
