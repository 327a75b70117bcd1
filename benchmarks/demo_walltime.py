"""Wall time and peak RSS of the whole demo sequence (target: <= 30 min, <= 8 GB on 2 CPU cores).

Runs `dasslab run --profile demo` in a fresh run directory (data already generated is reused) and
samples the resident memory of the whole process tree (runner + notebook kernels) twice a second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 30 * 60
TARGET_RSS_GB = 8.0


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(profile: str, run_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dasslab", "run", "--profile", profile, "--run-dir", str(run_dir), *extra]
    env = dict(os.environ, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    return {
        "benchmark": "demo_walltime", "profile": profile, "returncode": proc.returncode,
        "wall_seconds": round(seconds, 1), "peak_rss_gb": round(peak / 2**30, 3),
        "per_notebook_seconds": {e["notebook"]: e["seconds"] for e in manifest.get("notebooks", [])},
        "targets": {"wall_seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_RSS_GB},
        "met": {"wall": seconds <= TARGET_SECONDS, "rss": peak / 2**30 <= TARGET_RSS_GB},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-demo"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_walltime.json"))
    ap.add_argument("extra", nargs="*", help="extra arguments for dasslab run")
    args = ap.parse_args()
    res = measure(args.profile, Path(args.run_dir), args.extra)
    sys.path.insert(0, str(ROOT / "lib"))
    from dasslab.runs import atomic_save_json

    atomic_save_json(args.out, res)
    print(json.dumps(res, indent=2))
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
