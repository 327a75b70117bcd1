"""Run every benchmark (``make bench``) and print one summary table of the results against targets.

Each benchmark is its own script writing JSON under ``benchmarks/results/``; this runs them one after
another in fresh processes (so one's memory does not count in the next) and then summarises whatever
results are on disk. The whole-demo timing takes up to 30 minutes and runs only with ``--demo``.
Measure on an idle machine: other processes inflate every wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK = ["toystreets_speed.py", "seg_train_speed.py", "kpn_speed.py", "translation_throughput.py"]


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def summary() -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, target, met) rows from the result files present."""
    rows = []
    if r := _load("demo_walltime.json"):
        rows.append(("make demo wall time", f"{r['wall_seconds'] / 60:.1f} min", "<= 30 min", str(r["met"]["wall"])))
        rows.append(("make demo peak RSS", f"{r['peak_rss_gb']:.2f} GB", "<= 8 GB", str(r["met"]["rss"])))
    for f in sorted(RESULTS.glob("translation_throughput_*.json")):
        r = json.loads(f.read_text())
        ips = ", ".join(f"{k.split(' ')[0]} {v:g}" for k, v in r["images_per_second"].items())
        rows.append((f"translation images/s ({r['device']})", ips, "-", "-"))
        rows.append((f"SGG overhead vs SDEdit ({r['device']})", f"{r['guidance_overhead']['wall']:.2f}x wall, "
                     f"{r['guidance_overhead']['cpu']:.2f}x CPU", f"<= {r['target_overhead']}x", str(r["met"])))
    if r := _load("seg_train_speed.json"):
        rows.append((f"one segmenter training ({r['profile']} [seg])", f"{r['projected_train_seconds']:.1f} s",
                     f"<= {r['target_seconds']} s", str(r["ok"])))
    if r := _load("kpn_speed.json"):
        for m in ("kpn", "cyclegan"):
            t = r[m]
            rows.append((f"{m} training ({r['profile']})", f"{t['projected_train_seconds']:.0f} s",
                         f"<= {t['target_seconds']} s", str(t["projected_train_seconds"] <= (t["target_seconds"] or 1e9))))
    if r := _load("toystreets_speed.json"):
        rows.append((f"ToyStreets generation ({r['profile']})", f"{r['generate_seconds']:.1f} s",
                     f"<= {r['target_seconds']} s", str(r["ok"])))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="also time the whole demo (up to 30 minutes)")
    ap.add_argument("--summary-only", action="store_true", help="only summarise the results on disk")
    args = ap.parse_args()
    failed = []
    if not args.summary_only:
        for script in QUICK + (["demo_walltime.py"] if args.demo else []):
            print(f"[bench] {script}", flush=True)
            if subprocess.call([sys.executable, str(HERE / script)]) != 0:
                failed.append(script)
    rows = summary()
    width = max((len(r[0]) for r in rows), default=10)
    print("\n| benchmark | measured | target | met |\n|---|---|---|---|")
    for name, val, target, met in rows:
        print(f"| {name:<{width}} | {val} | {target} | {met} |")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
