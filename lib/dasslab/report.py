"""Tables, figures and the run report across methods; parameter sweeps over notebooks.

Everything here reads what the notebooks wrote (metrics JSON, translated sets, figures), so the
report a reader gets without Jupyter shows exactly the numbers the notebooks computed.
"""

from __future__ import annotations

import datetime as _dt
import html
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dasslab import runs

# translated sets the sequence makes, and the notebook that makes each
PRODUCERS = {
    "sdedit": "01_target_diffusion",
    "sgg": "02_semantic_gradient_guidance",
    "sgg_ptl": "03_progressive_translation",
    "kpn": "05_kpn_baseline",
    "cyclegan": "05_kpn_baseline",
}
ZERO_SHOT_PREFIX = "zodi_"
BASELINES = ("source_only", "oracle")


# --------------------------------------------------------------------------- translated sets


def discover_translated(rd: runs.RunDir) -> pd.DataFrame:
    """One row per translated set in the run (and per expected set that is missing)."""
    rows = []
    root = rd.artifacts / "translated"
    found = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    for p in found:
        meta = {}
        if (p / "translation.json").is_file():
            meta = json.loads((p / "translation.json").read_text())
        n = len(list((p / "images").glob("*.png"))) if (p / "images").is_dir() else 0
        rows.append({
            "method": p.name, "status": "present" if n else "empty", "path": str(p), "n_images": n,
            "seconds_per_image": meta.get("seconds_per_image", meta.get("sec_per_image")),
            "zero_shot": p.name.startswith(ZERO_SHOT_PREFIX),
            "producer": PRODUCERS.get(p.name, "04_zero_shot_zodi" if p.name.startswith(ZERO_SHOT_PREFIX) else None),
        })
    have = {r["method"] for r in rows}
    for method, producer in PRODUCERS.items():
        if method not in have:
            rows.append({"method": method, "status": "missing", "path": None, "n_images": 0,
                         "seconds_per_image": None, "zero_shot": False, "producer": producer})
    cols = ["method", "status", "n_images", "seconds_per_image", "zero_shot", "producer", "path"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- comparison tables


def comparison_table(results: pd.DataFrame, source: str = "source_only", oracle: str = "oracle") -> pd.DataFrame:
    """Mean and spread of mIoU over seeds per method, gain over source-only, share of the gap closed.

    ``results`` is the tidy table of ``seg.train_and_evaluate`` (method, seed, class, IoU) with a
    class ``"mIoU"`` row per (method, seed). A method *beats* source-only only when its gain exceeds
    the larger of the two standard deviations (the spread over seeds).
    """
    m = results[results["class"] == "mIoU"]
    if m.empty:
        raise ValueError("results table has no class == 'mIoU' rows (expected seg.train_and_evaluate output)")
    g = m.groupby("method")["IoU"]
    table = pd.DataFrame({"mIoU_mean": g.mean(), "mIoU_std": g.std(ddof=1).fillna(0.0), "n_seeds": g.count()})
    if source in table.index:
        s_mean, s_std = table.loc[source, ["mIoU_mean", "mIoU_std"]]
        table["gain_vs_source"] = table["mIoU_mean"] - s_mean
        table["beats_source"] = table["gain_vs_source"] > np.maximum(table["mIoU_std"], s_std)
        if oracle in table.index:
            gap = table.loc[oracle, "mIoU_mean"] - s_mean
            table["gap_closed"] = table["gain_vs_source"] / gap if gap > 0 else np.nan
    return table.sort_values("mIoU_mean", ascending=False)


def beats(table: pd.DataFrame, a: str, b: str) -> bool:
    """True when method a's mean mIoU exceeds b's by more than the larger spread over seeds."""
    if a not in table.index or b not in table.index:
        return False
    diff = table.loc[a, "mIoU_mean"] - table.loc[b, "mIoU_mean"]
    return bool(diff > max(table.loc[a, "mIoU_std"], table.loc[b, "mIoU_std"]))


def per_class_matrix(results: pd.DataFrame) -> pd.DataFrame:
    """Method x class mean IoU (classes in the order they appear), for the heatmap."""
    r = results[results["class"] != "mIoU"]
    order = list(dict.fromkeys(r["class"]))
    mat = r.groupby(["method", "class"])["IoU"].mean().unstack("class")
    return mat.reindex(columns=[c for c in order if c in mat.columns])


def plot_per_class_heatmap(matrix: pd.DataFrame, ax=None, title: str = "IoU per class (mean over seeds)"):
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.55 * matrix.shape[1], 0.8 + 0.45 * matrix.shape[0]))
    sns.heatmap(matrix, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "IoU %"}, annot_kws={"fontsize": 7})
    ax.set_title(title)
    ax.set_xlabel("")
    ax.set_ylabel("")
    return ax


def plot_comparison(table: pd.DataFrame, ax=None, title: str = "Target val mIoU (mean ± std over seeds)"):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(table)))
    t = table.sort_values("mIoU_mean")
    colors = ["#888888" if m in BASELINES else "#3b75af" for m in t.index]
    ax.barh(t.index, t["mIoU_mean"], xerr=t["mIoU_std"], color=colors, capsize=3)
    ax.set_xlabel("mIoU %")
    ax.set_title(title)
    for i, (m, v) in enumerate(t["mIoU_mean"].items()):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    return ax


def qualitative_figure(rd: runs.RunDir, source_dataset, methods: list[str], n: int = 4, colourise=None):
    """The same source images through every translated set, labels beside them."""
    import matplotlib.pyplot as plt
    from PIL import Image

    names = list(source_dataset.names)[:n]
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(names), cols, figsize=(2.2 * cols, 1.3 * len(names) + 0.4), squeeze=False)
    index = {name: i for i, name in enumerate(source_dataset.names)}
    for r, name in enumerate(names):
        item = source_dataset[index[name]]
        axes[r, 0].imshow(to_uint8(item["image"]))
        lab = item["label"].numpy()
        axes[r, 1].imshow(colourise(lab) if colourise else lab, interpolation="nearest")
        for c, method in enumerate(methods):
            p = rd.translated(method) / "images" / f"{name}.png"
            ax = axes[r, 2 + c]
            if p.is_file():
                ax.imshow(np.asarray(Image.open(p).convert("RGB")))
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
    for c, title in enumerate(["source", "label", *methods]):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def to_uint8(img) -> np.ndarray:
    """An (H, W, 3) uint8 image from a dasslab tensor in [-1, 1] (CHW or HWC), for imshow."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip((a + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return a


# --------------------------------------------------------------------------- report.md / html


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, (int, float, str, bool)) or d is None:
        out[prefix] = d
    return out


def headline_table(metrics: dict, max_rows: int = 40) -> pd.DataFrame:
    """Scalar entries of one notebook's metrics JSON (nested keys dotted), the first ``max_rows``."""
    flat = _flatten(metrics)
    rows = [(k, v) for k, v in flat.items() if not isinstance(v, str) or len(v) < 80]
    return pd.DataFrame(rows[:max_rows], columns=["metric", "value"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def md_table(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-Markdown table (no tabulate dependency), floats to 4 significant digits."""
    d = df.reset_index() if index else df
    head = "| " + " | ".join(str(c) for c in d.columns) + " |"
    sep = "|" + "|".join("---" for _ in d.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def write_report(rd: runs.RunDir, title: str | None = None, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Assemble ``report.md`` and ``report.html`` from the manifest, every metrics JSON and figures."""
    manifest = json.loads(rd.manifest_path.read_text()) if rd.manifest_path.is_file() else {}
    lines = [f"# {title or 'dasslab run report'}", ""]
    lines.append(f"Run directory: `{rd.path}`  ")
    lines.append(f"Generated: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}  ")
    if manifest:
        git = manifest.get("git", {})
        lines.append(f"Profile: `{manifest.get('profile')}`; commit `{git.get('commit')}`"
                     f"{' (dirty)' if git.get('dirty') else ''}; device: "
                     f"{'CUDA ' + ', '.join(manifest['device'].get('gpus', [])) if manifest.get('device', {}).get('cuda') is True else 'CPU'}")
        lines += ["", "## Notebooks", "", "| notebook | status | seconds |", "|---|---|---|"]
        for e in manifest.get("notebooks", []):
            lines.append(f"| {e['notebook']} | {e['status']} | {_fmt(e.get('seconds'))} |")
    for title_, body in extra_sections or []:
        lines += ["", f"## {title_}", "", body]
    for stem in runs.NOTEBOOKS:
        p = rd.metrics_dir / f"{stem}.json"
        lines += ["", f"## {stem}", ""]
        if not p.is_file():
            lines.append("_not run in this run directory_")
            continue
        lines.append(md_table(headline_table(json.loads(p.read_text())), index=False))
        figs = sorted(rd.figures.glob(f"{stem[:2]}_*.png"))
        for f in figs:
            lines += ["", f"![{f.stem}](figures/{f.name})"]
    md = "\n".join(lines) + "\n"
    out = rd.path / "report.md"
    with runs.atomic_write(out, "w") as f:
        f.write(md)
    with runs.atomic_write(rd.path / "report.html", "w") as f:
        f.write(markdown_to_html(md, title or "dasslab run report"))
    return out


def markdown_to_html(md: str, title: str) -> str:
    try:
        import markdown

        body = markdown.markdown(md, extensions=["tables"])
    except ImportError:  # plain fallback keeps the numbers readable
        body = f"<pre>{html.escape(md)}</pre>"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>\n"


# --------------------------------------------------------------------------- sweeps


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["guidance_scale=10,30", "strength=0.4,0.6"]`` -> {name: [values]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values:
            raise ValueError(f"grid entry {item!r} must look like name=v1,v2,...")
        grid[name.strip()] = [runs.parse_param(f"x={v}")[1] for v in values.split(",")]
    return grid


def sweep(notebook: str, grid: dict[str, list[Any]], profile: str = "demo", base_run_dir: str | os.PathLike = "runs/sweep",
          base_params: dict | None = None, prerequisites: str | os.PathLike | None = None,
          nb_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Run one notebook over a parameter grid, one run directory per point, and collect its metrics.

    ``prerequisites``: a finished run directory whose artifacts the notebook reads (e.g. the DDPM of
    notebook 01); each point gets a symlink to them so earlier notebooks are not re-run.
    """
    base = Path(base_run_dir)
    names = list(grid)
    rows = []
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        tag = "_".join(f"{k}-{v}" for k, v in point.items()).replace("/", "-")
        rd = runs.RunDir(base / tag)
        if prerequisites:
            link_prerequisites(runs.RunDir(prerequisites), rd, notebook, nb_dir)
        params = {**(base_params or {}), **point}
        status = "ok"
        try:
            runs.run_notebooks(profile, rd.path, only=[notebook], params=params, nb_dir=nb_dir)
        except runs.RunError as e:
            status = f"failed: {e}"
        stem = _stem(notebook, nb_dir)
        metrics = json.loads((rd.metrics_dir / f"{stem}.json").read_text()) if status == "ok" else {}
        rows.append({**point, "run_dir": str(rd.path), "status": status,
                     **{k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float))}})
    table = pd.DataFrame(rows)
    runs.atomic_save_json(base / "sweep.json", {"notebook": notebook, "grid": grid, "rows": table})
    with runs.atomic_write(base / "sweep.csv", "w") as f:
        table.to_csv(f, index=False)
    return table


def _stem(notebook: str, nb_dir=None) -> str:
    return runs.select_notebooks(runs.present_notebooks(Path(nb_dir) if nb_dir else None), only=[notebook])[0].stem


def link_prerequisites(src: runs.RunDir, dst: runs.RunDir, notebook: str, nb_dir=None) -> list[Path]:
    """Symlink the artifacts of a finished run that ``notebook`` reads, never what it writes.

    Top-level artifacts (the DDPM, zero-shot models) are linked whole; translated sets and
    segmenters one by one, leaving out the sets the swept notebook itself produces, so a sweep
    point never writes into (or resumes from) the prerequisite run.
    """
    stem = _stem(notebook, nb_dir)
    own = {m for m, producer in PRODUCERS.items() if producer == stem}
    linked = []
    for sub in sorted(src.artifacts.iterdir()):
        if sub.name in ("translated", "segmenters"):
            for item in sorted(sub.iterdir()):
                if sub.name == "translated" and (item.name in own or (
                        stem == "04_zero_shot_zodi" and item.name.startswith(ZERO_SHOT_PREFIX))):
                    continue
                target = dst.artifacts / sub.name / item.name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(item.resolve(), target_is_directory=item.is_dir())
                    linked.append(target)
        elif sub.name != "evaluations" and not (dst.artifacts / sub.name).exists():
            (dst.artifacts / sub.name).symlink_to(sub.resolve(), target_is_directory=sub.is_dir())
            linked.append(dst.artifacts / sub.name)
    return linked


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="assemble report.md/html of a run directory")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=lambda a: print(write_report(runs.RunDir(a.run_dir))) or 0)

    s = subparsers.add_parser("sweep", help="run one notebook over a parameter grid")
    s.add_argument("--notebook", required=True, help="number or stem, e.g. 02")
    s.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2", help="grid axes")
    s.add_argument("--profile", default="demo")
    s.add_argument("--run-dir", default="runs/sweep", help="base directory; one sub-directory per point")
    s.add_argument("--prerequisites", help="finished run directory whose artifacts the notebook reads")
    s.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE")
    s.set_defaults(func=_cli_sweep)


def _cli_sweep(args) -> int:
    table = sweep(args.notebook, parse_grid(args.grid), args.profile, args.run_dir,
                  dict(runs.parse_param(t) for t in args.param), args.prerequisites)
    print(table.to_string(index=False))
    return 0 if (table["status"] == "ok").all() else 1
