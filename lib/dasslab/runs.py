"""Profiles, run directories, atomic writes and the papermill runner.

A run directory is the only channel between notebooks: each one reads what earlier ones wrote there
and ends by writing ``metrics/<stem>.json``. The runner executes the notebooks in order, records a
manifest and stops at the first failure so a broken chapter is never silently skipped.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable, Iterator

NOTEBOOKS = (
    "00_data_prep",
    "01_target_diffusion",
    "02_semantic_gradient_guidance",
    "03_progressive_translation",
    "04_zero_shot_zodi",
    "05_kpn_baseline",
    "06_adaptation_evaluation",
)
PROFILE_DIR = Path(__file__).with_name("profiles")
COMMON_PARAMETERS = ("profile", "run_dir", "device", "data_root")
HEADLESS_ENV = "DASSLAB_HEADLESS"


class RunError(RuntimeError):
    """A run could not start or a notebook failed; the message says what to open or fix."""


# --------------------------------------------------------------------------- configuration


class Config(dict):
    """A dict with attribute access, so notebooks read ``cfg.seg.iters``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"config has no key {name!r}; keys: {sorted(self)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    @classmethod
    def wrap(cls, obj: Any) -> Any:
        if isinstance(obj, dict):
            return cls({k: cls.wrap(v) for k, v in obj.items()})
        if isinstance(obj, list):
            return [cls.wrap(v) for v in obj]
        return obj


def project_root(start: Path | None = None) -> Path:
    """The checkout holding pyproject.toml (so notebooks opened from notebooks/ find data/ and runs/)."""
    env = os.environ.get("DASSLAB_HOME")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "lib" / "dasslab").is_dir():
            return p
    return here


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def read_profile(profile: str | os.PathLike) -> dict:
    """Parse a profile by name (``demo``) or by path to a TOML file."""
    path = Path(profile)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{profile}.toml"
    if not path.is_file():
        raise RunError(
            f"unknown profile {str(profile)!r}; valid profiles: {', '.join(available_profiles())}"
            " (or a path to a .toml file)"
        )
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RunError(f"profile file {path} is not valid TOML: {e}") from e


def load_config(
    profile: str = "demo",
    notebook: str | None = None,
    run_dir: str | os.PathLike | None = None,
    device: str = "auto",
    data_root: str | os.PathLike | None = None,
    overrides: dict | None = None,
) -> Config:
    """Resolve a profile into the config one notebook sees.

    ``overrides`` are the notebook's own parameters: ``None`` keeps the profile's value, anything else
    wins. A key the notebook's table does not define is an error, so a typo never runs silently.
    The data root comes from ``data_root``, else ``$DASSLAB_DATA_ROOT``, else the profile.
    """
    raw = read_profile(profile)
    root = project_root()
    cfg = Config.wrap(raw)
    cfg.profile = str(profile)
    cfg.device = device
    cfg.run_dir = _resolve(run_dir if run_dir is not None else Path("runs") / Path(str(profile)).stem, root)
    data = cfg.setdefault("data", Config())
    if data_root is None:
        data_root = os.environ.get("DASSLAB_DATA_ROOT") or data.get("root", "data")
    data["root"] = _resolve(data_root, root)
    cfg.setdefault("seg", Config())
    nb = Config.wrap(dict(raw.get(notebook, {}))) if notebook else Config()
    for key, value in (overrides or {}).items():
        if key not in nb:
            raise KeyError(
                f"parameter {key!r} is not defined for notebook {notebook!r} in profile "
                f"{cfg.profile!r}; defined: {sorted(nb) or 'none'}"
            )
        if value is not None:
            nb[key] = Config.wrap(value)
    cfg.nb = nb
    cfg.notebook = notebook
    return cfg


def _resolve(p: str | os.PathLike, root: Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temp name beside ``path`` and rename on success; on error nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path for libraries that write files themselves (PIL, safetensors, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    """numpy, torch, pandas and Path values to plain JSON; NaN becomes null."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    mod = type(obj).__module__
    if mod.startswith("numpy"):
        return to_jsonable(obj.tolist())
    if mod.startswith("torch"):
        return to_jsonable(obj.detach().cpu().tolist())
    if mod.startswith("pandas"):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict(orient="records") if hasattr(obj, "columns") else obj.to_dict())
    return str(obj)


def atomic_save_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# --------------------------------------------------------------------------- run directory


class RunDir:
    """The folder one run writes: notebooks/, artifacts/, figures/, metrics/, manifest.json."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        for sub in ("notebooks", "artifacts", "figures", "metrics"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def translated(self, method: str) -> Path:
        return self.artifacts / "translated" / method

    def segmenter_dir(self, name: str) -> Path:
        return self.artifacts / "segmenters" / name

    def require(self, path: str | os.PathLike, producer: str) -> Path:
        """The path, or an error naming the notebook that makes it."""
        p = Path(path)
        if not p.is_absolute():
            p = self.path / p
        if not p.exists():
            raise FileNotFoundError(
                f"{p} is missing: run notebook {producer} first in this run directory "
                f"(dasslab run --run-dir {self.path} --only {producer[:2]})"
            )
        return p

    def write_metrics(self, notebook: str, metrics: dict) -> Path:
        return atomic_save_json(self.metrics_dir / f"{Path(notebook).stem}.json", metrics)

    def read_metrics(self, notebook: str) -> dict:
        p = self.require(self.metrics_dir / f"{Path(notebook).stem}.json", Path(notebook).stem)
        return json.loads(p.read_text())

    def available_metrics(self) -> list[str]:
        return sorted(p.stem for p in self.metrics_dir.glob("*.json"))

    def save_figure(self, fig, name: str, dpi: int = 110) -> Path:
        name = name if name.endswith(".png") else f"{name}.png"
        out = self.figures / name
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        return out


# --------------------------------------------------------------------------- machine habits


def pick_device(name="auto"):
    """cuda when present (or asked for), else cpu; asking for cuda without one is an error.
    ``name``: "auto" / None, a device string, or a ``torch.device`` (returned as is when usable)."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but torch sees no CUDA device; use 'auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states (torch, CUDA, numpy, random), for checkpoints that resume exactly."""
    import numpy as np
    import torch

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def accelerator_for(device="auto", amp: bool = True):
    """The ``accelerate.Accelerator`` every training loop uses: on ``device``, mixed precision (bf16, else
    fp16) on CUDA only. Under ``accelerate launch`` it is the distributed one; in a single process a
    second loop with other settings resets Accelerate's process state instead of failing."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = pick_device(device)
    mp = "no"
    if device.type == "cuda" and amp:
        mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    kw = {"cpu": device.type == "cpu", "mixed_precision": mp}
    try:
        return Accelerator(**kw)
    except ValueError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kw)


def loop_state(accelerator) -> dict:
    """What a checkpoint needs besides weights and optimizer for an exact resume: the global RNGs and
    the mixed-precision loss scaler (None off CUDA)."""
    return {"rng": rng_state(), "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}


def restore_loop_state(accelerator, state: dict) -> None:
    """Undo :func:`loop_state` on resume; call after ``accelerator.prepare`` (which builds the scaler)."""
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def set_threads(n: int | None = None) -> int:
    """Torch intra-op threads from the machine (or DASSLAB_THREADS), never hard-coded."""
    import torch

    n = n or int(os.environ.get("DASSLAB_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def progress(iterable: Iterable | None = None, **kw):
    """tqdm, quiet when TQDM_DISABLE=1 (CI) or when ``disable`` is passed."""
    from tqdm.auto import tqdm

    kw.setdefault("disable", os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def interactive() -> bool:
    """True in a live Jupyter session; False under papermill or plain Python (widgets off)."""
    if os.environ.get(HEADLESS_ENV) == "1":
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell" and "PAPERMILL_INPUT_PATH" not in os.environ


# --------------------------------------------------------------------------- papermill runner


def notebook_dir() -> Path:
    return project_root() / "notebooks"


def present_notebooks(nb_dir: Path | None = None) -> list[Path]:
    nb_dir = nb_dir or notebook_dir()
    return [nb_dir / f"{s}.ipynb" for s in NOTEBOOKS if (nb_dir / f"{s}.ipynb").is_file()]


def select_notebooks(paths: list[Path], only: list[str] | None = None, start: str | None = None) -> list[Path]:
    """Filter by number or stem: ``--only 02 03`` and ``--from 02``."""

    def match(p: Path, key: str) -> bool:
        return p.stem == key or p.stem.split("_", 1)[0] == key.zfill(2)

    known = ", ".join(p.stem for p in paths)
    for key in (only or []) + ([start] if start else []):
        if not any(match(p, key) for p in paths):
            raise RunError(f"no notebook matches {key!r}; present: {known}")
    if start:
        first = next(i for i, p in enumerate(paths) if match(p, start))
        paths = paths[first:]
    if only:
        paths = [p for p in paths if any(match(p, k) for k in only)]
    return paths


def notebook_parameters(path: Path) -> dict:
    """Names and defaults of a notebook's ``parameters`` cell (via papermill's inspector)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def parse_param(text: str) -> tuple[str, Any]:
    """``name=value``: the value as a Python/JSON literal when it parses, else as a string."""
    if "=" not in text:
        raise RunError(f"parameter {text!r} must look like name=value")
    name, raw = text.split("=", 1)
    name = name.strip()
    if not name.isidentifier():
        raise RunError(f"parameter name {name!r} is not a valid identifier")
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.strip().lower() in lowered:
        return name, lowered[raw.strip().lower()]
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw


def check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise RunError(
            f"Jupyter kernel {kernel_name!r} is not installed for {sys.executable}. Install it with:\n"
            f"  {sys.executable} -m pip install ipykernel && "
            f"{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}"
        ) from None


def _git_info(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict:
    from importlib import metadata

    names = ["dasslab", "torch", "torchvision", "diffusers", "timm", "accelerate", "papermill", "numpy",
             "pandas", "scikit-image", "transformers", "sentence-transformers"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _device_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0))}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # torch missing or broken: record, do not fail the manifest
        info["cuda"] = f"unknown ({e})"
    return info


def run_notebooks(
    profile: str = "demo",
    run_dir: str | os.PathLike | None = None,
    only: list[str] | None = None,
    start: str | None = None,
    params: dict | None = None,
    kernel_name: str = "python3",
    nb_dir: str | os.PathLike | None = None,
    log_output: bool = False,
) -> dict:
    """Execute the notebooks in order with papermill; write the manifest; stop at the first failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    read_profile(profile)  # unknown profile -> RunError listing the valid ones
    root = project_root()
    params = dict(params or {})
    paths = select_notebooks(present_notebooks(Path(nb_dir) if nb_dir else None), only, start)
    if not paths:
        raise RunError(f"no notebooks found in {nb_dir or notebook_dir()}")
    declared = {p.stem: notebook_parameters(p) for p in paths}
    valid = sorted(set().union(*[set(d) for d in declared.values()]))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise RunError(
            f"unknown parameter(s) {', '.join(unknown)} for notebooks {', '.join(declared)}; "
            f"valid: {', '.join(valid)}"
        )
    check_kernel(kernel_name)

    run_path = _resolve(run_dir if run_dir is not None else Path("runs") / Path(profile).stem, root)
    rd = RunDir(run_path)
    manifest = {
        "run_dir": str(rd.path),
        "profile": str(profile),
        "parameters": params,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "status": "running",
        "git": _git_info(root),
        "versions": _versions(),
        "device": _device_info(),
        "command": sys.argv,
        "notebooks": [{"notebook": p.stem, "status": "pending", "seconds": None,
                       "executed": str(rd.path / "notebooks" / p.name)} for p in paths],
    }
    atomic_save_json(rd.manifest_path, manifest)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ[HEADLESS_ENV] = "1"
    os.environ["DASSLAB_HOME"] = str(root)

    for entry, path in zip(manifest["notebooks"], paths):
        inject = {"profile": str(profile), "run_dir": str(rd.path)}
        inject.update({k: v for k, v in params.items() if k in declared[path.stem]})
        inject = {k: v for k, v in inject.items() if k in declared[path.stem]}
        entry["parameters"] = inject
        entry["status"] = "running"
        atomic_save_json(rd.manifest_path, manifest)
        print(f"[dasslab] {path.stem} ...", flush=True)
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(path), entry["executed"], parameters=inject, kernel_name=kernel_name,
                cwd=str(root), progress_bar=False, log_output=log_output, report_mode=False,
            )
        except PapermillExecutionError as e:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2),
                         error=f"{e.ename}: {e.evalue}")
            manifest.update(status="failed", failed=path.stem,
                            finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            atomic_save_json(rd.manifest_path, manifest)
            _refresh_report(rd)
            raise RunError(
                f"notebook {path.stem} failed ({e.ename}: {e.evalue}).\n"
                f"Open the executed copy to see the failing cell: {entry['executed']}"
            ) from None
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 2))
        atomic_save_json(rd.manifest_path, manifest)
        print(f"[dasslab] {path.stem} ok ({entry['seconds']:.0f} s)", flush=True)

    manifest.update(status="ok", finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_save_json(rd.manifest_path, manifest)
    _refresh_report(rd)
    print(f"[dasslab] done: {rd.path} (manifest.json, notebooks/, metrics/, figures/)", flush=True)
    return manifest


def _refresh_report(rd: RunDir) -> None:
    """Re-assemble report.md with the final manifest (notebook 06 writes it before the run ends)."""
    from dasslab import report

    sections = []
    old = rd.path / "report.md"
    if old.is_file():  # keep the sections notebook 06 added
        text = old.read_text()
        for block in text.split("\n## ")[1:]:
            title, _, body = block.partition("\n")
            if title.startswith(("Comparison", "Translation quality")):
                sections.append((title, body.strip()))
    report.write_report(rd, extra_sections=sections)


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="execute the notebooks in order with papermill")
    p.add_argument("--profile", default="demo", help=f"one of: {', '.join(available_profiles())}")
    p.add_argument("--only", nargs="+", metavar="NB", help="notebook numbers or stems, e.g. 02 03")
    p.add_argument("--from", dest="start", metavar="NB", help="start at this notebook")
    p.add_argument("--run-dir", help="run directory (default runs/<profile>)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter override (repeatable)")
    p.add_argument("--kernel", default="python3")
    p.add_argument("--log-output", action="store_true", help="stream notebook output")
    p.set_defaults(func=_cli_run)

    q = subparsers.add_parser("profiles", help="list profiles and their notebook parameters")
    q.set_defaults(func=_cli_profiles)


def _cli_run(args) -> int:
    params = dict(parse_param(t) for t in args.param)
    run_notebooks(args.profile, args.run_dir, args.only, args.start, params, args.kernel,
                  log_output=args.log_output)
    return 0


def _cli_profiles(args) -> int:
    for name in available_profiles():
        print(f"{name}: {read_profile(name).get('description', '')}")
    return 0
