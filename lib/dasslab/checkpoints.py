"""Training checkpoints as folders: ``<out_dir>/checkpoints/step_<n>/`` with one safetensors file per
state dict and ``state.pt`` (optimizer, schedule, RNGs, history). A folder is written under a temp
name and renamed, so a checkpoint is complete or absent; the newest ``keep`` are kept. Shared by the
segmenter, DA-KPN and CycleGAN loops."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dasslab import runs

CKPT_PREFIX = "step_"


def step_folders(folder: Path) -> list[tuple[int, Path]]:
    """Complete ``step_<n>`` checkpoints (with ``state.pt``) directly under ``folder``, oldest first."""
    found = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file():
                try:
                    found.append((int(p.name[len(CKPT_PREFIX):]), p))
                except ValueError:
                    pass
    return sorted(found)


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    return step_folders(Path(out_dir) / "checkpoints")


def save_checkpoint(out_dir: Path, step: int, tensors: dict[str, dict], state: dict, keep: int = 2) -> Path:
    """Writes ``<name>.safetensors`` for each state dict in ``tensors`` and ``state.pt`` into a temp
    folder, then renames it to ``checkpoints/step_<step>``: a checkpoint is complete or absent."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoints(out_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_tensors(path: Path, name: str) -> dict:
    from safetensors.torch import load_file

    f = Path(path) / f"{name}.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint file {f} is missing")
    return load_file(str(f))


def save_tensors(path: Path, sd: dict) -> Path:
    """Atomic safetensors file (for the final model beside the checkpoints)."""
    from safetensors.torch import save_file

    with runs.atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
    return Path(path)
