"""The spine: profiles, config resolution, run directories, atomic writes, the papermill runner."""

import json
import os
from pathlib import Path

import nbformat
import pytest

from dasslab import runs
from dasslab.cli import main as cli_main


def write_nb(path: Path, params: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    pcell = nbformat.v4.new_code_cell(params)
    pcell.metadata["tags"] = ["parameters"]
    nb.cells = [pcell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


RECORD = (
    "import json, pathlib\n"
    "out = pathlib.Path(run_dir) / 'metrics'\n"
    "out.mkdir(parents=True, exist_ok=True)\n"
    "(out / '{stem}.json').write_text(json.dumps(dict(profile=profile, {extra})))\n"
)


@pytest.fixture
def nb_dir(tmp_path):
    d = tmp_path / "notebooks"
    write_nb(d / "00_data_prep.ipynb", 'profile = "demo"\nrun_dir = "runs/demo"\nn_show = None',
             RECORD.format(stem="00_data_prep", extra="n_show=n_show"))
    write_nb(d / "01_target_diffusion.ipynb", 'profile = "demo"\nrun_dir = "runs/demo"\nstrength = 0.5',
             RECORD.format(stem="01_target_diffusion", extra="strength=strength"))
    return d


def test_profiles_exist_and_parse():
    names = runs.available_profiles()
    for p in ("tiny", "demo", "paper-gta2cs", "paper-cs2acdc"):
        assert p in names
        prof = runs.read_profile(p)
        assert {"data", "seg"} <= set(prof)
        for nb in runs.NOTEBOOKS:
            assert nb in prof, f"profile {p} lacks a table for {nb}"


def test_unknown_profile_lists_valid():
    with pytest.raises(runs.RunError, match="valid profiles: .*demo.*tiny"):
        runs.read_profile("nope")


def test_load_config_overrides(tmp_path):
    cfg = runs.load_config("tiny", notebook="00_data_prep", run_dir=tmp_path / "r",
                           overrides={"n_show": 2})
    assert cfg.nb.n_show == 2
    assert cfg.run_dir == (tmp_path / "r").resolve()
    assert cfg.data.root.is_absolute()
    keep = runs.load_config("tiny", notebook="00_data_prep", overrides={"n_show": None})
    assert keep.nb.n_show == runs.read_profile("tiny")["00_data_prep"]["n_show"]
    with pytest.raises(KeyError, match="not defined for notebook '00_data_prep'.*n_show"):
        runs.load_config("tiny", notebook="00_data_prep", overrides={"n_shw": 1})


def test_data_root_override(tmp_path):
    cfg = runs.load_config("tiny", notebook="00_data_prep", data_root=tmp_path / "d")
    assert cfg.data.root == (tmp_path / "d").resolve()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    runs.atomic_save_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with runs.atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_to_jsonable_converts_numpy_torch_nan():
    import numpy as np
    import torch

    out = runs.to_jsonable({"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": float("nan"), "d": Path("/x")})
    assert out == {"a": 1.5, "b": [1, 2], "c": None, "d": "/x"}


def test_rundir_require_names_producer(tmp_path):
    rd = runs.RunDir(tmp_path / "run")
    assert (rd.path / "metrics").is_dir() and (rd.path / "artifacts").is_dir()
    with pytest.raises(FileNotFoundError, match="run notebook 01_target_diffusion first"):
        rd.require("artifacts/ddpm", producer="01_target_diffusion")
    rd.write_metrics("02_semantic_gradient_guidance", {"mIoU": 1.0})
    assert rd.read_metrics("02_semantic_gradient_guidance") == {"mIoU": 1.0}
    assert rd.translated("sgg") == rd.path / "artifacts" / "translated" / "sgg"


def test_select_notebooks(nb_dir):
    paths = runs.present_notebooks(nb_dir)
    assert [p.stem for p in runs.select_notebooks(paths, only=["01"])] == ["01_target_diffusion"]
    assert [p.stem for p in runs.select_notebooks(paths, start="01")] == ["01_target_diffusion"]
    with pytest.raises(runs.RunError, match="no notebook matches '05'"):
        runs.select_notebooks(paths, only=["05"])


def test_parse_param():
    assert runs.parse_param("x=0.5") == ("x", 0.5)
    assert runs.parse_param("x=[1, 2]") == ("x", [1, 2])
    assert runs.parse_param("x=hello") == ("x", "hello")
    assert runs.parse_param("x=none") == ("x", None)
    with pytest.raises(runs.RunError):
        runs.parse_param("novalue")


def test_runner_injects_parameters_and_writes_manifest(nb_dir, tmp_path):
    run_dir = tmp_path / "run"
    manifest = runs.run_notebooks("tiny", run_dir, params={"strength": 0.75}, nb_dir=nb_dir)
    assert manifest["status"] == "ok"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [e["notebook"] for e in m["notebooks"]] == ["00_data_prep", "01_target_diffusion"]
    assert all(e["status"] == "ok" and e["seconds"] >= 0 for e in m["notebooks"])
    assert m["profile"] == "tiny" and m["parameters"] == {"strength": 0.75}
    assert "torch" in m["versions"] and "commit" in m["git"] and "cuda" in m["device"]
    assert json.loads((run_dir / "metrics" / "01_target_diffusion.json").read_text()) == {
        "profile": "tiny", "strength": 0.75}
    # a parameter a notebook does not declare is not injected into it
    assert json.loads((run_dir / "metrics" / "00_data_prep.json").read_text())["n_show"] is None
    assert (run_dir / "notebooks" / "01_target_diffusion.ipynb").is_file()
    assert "01_target_diffusion | ok" in (run_dir / "report.md").read_text()


def test_runner_rejects_unknown_parameter(nb_dir, tmp_path):
    with pytest.raises(runs.RunError, match="unknown parameter.*strenght.*valid: .*strength"):
        runs.run_notebooks("tiny", tmp_path / "run", params={"strenght": 1}, nb_dir=nb_dir)
    assert not (tmp_path / "run").exists()


def test_runner_stops_at_first_failure(nb_dir, tmp_path):
    write_nb(nb_dir / "00_data_prep.ipynb", 'profile = "demo"\nrun_dir = "x"', "raise ValueError('bad data')")
    with pytest.raises(runs.RunError) as err:
        runs.run_notebooks("tiny", tmp_path / "run", nb_dir=nb_dir)
    msg = str(err.value)
    assert "00_data_prep failed" in msg and "ValueError: bad data" in msg
    assert str(tmp_path / "run" / "notebooks" / "00_data_prep.ipynb") in msg
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["failed"] == "00_data_prep"
    assert [e["status"] for e in m["notebooks"]] == ["failed", "pending"]
    assert not (tmp_path / "run" / "metrics" / "01_target_diffusion.json").exists()


def test_missing_kernel_message():
    with pytest.raises(runs.RunError, match="ipykernel install"):
        runs.check_kernel("no-such-kernel-xyz")


def test_cli_unknown_profile(capsys):
    assert cli_main(["run", "--profile", "bogus"]) == 2
    assert "valid profiles" in capsys.readouterr().err


def test_cli_profiles(capsys):
    assert cli_main(["profiles"]) == 0
    assert "demo" in capsys.readouterr().out


def test_device_and_threads():
    assert runs.pick_device("cpu").type == "cpu"
    import torch

    assert runs.pick_device(torch.device("cpu")) == torch.device("cpu")  # a device passes through
    assert runs.set_threads(1) == 1
    runs.set_threads()
    assert not runs.interactive() or os.environ.get("JPY_PARENT_PID")


def test_accelerator_for_cpu_and_repeated_calls():
    """One Accelerator factory for every loop: CPU without mixed precision, and a second call with
    other settings in the same process works (single-process state is reset, not an error)."""
    acc = runs.accelerator_for("cpu", amp=True)
    assert acc.device.type == "cpu" and acc.mixed_precision == "no"
    again = runs.accelerator_for("cpu", amp=False)
    assert again.device.type == "cpu" and again.mixed_precision == "no"


def test_loop_state_round_trip_restores_the_rngs():
    import torch

    acc = runs.accelerator_for("cpu")
    st = runs.loop_state(acc)
    assert st["scaler"] is None  # no loss scaler off CUDA
    first = torch.rand(3)
    runs.restore_loop_state(acc, st)
    assert torch.equal(torch.rand(3), first)


def test_checkpoint_folders_are_complete_or_absent(tmp_path):
    import torch

    from dasslab import checkpoints

    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}},
                                    {"step": step}, keep=2)
    (tmp_path / "checkpoints" / "step_0000009").mkdir()  # an interrupted write: no state.pt
    found = checkpoints.checkpoints(tmp_path)
    assert [s for s, _ in found] == [2, 3]  # newest two kept, the incomplete folder ignored
    assert checkpoints.load_tensors(found[-1][1], "model")["w"].tolist() == [3.0, 3.0]
