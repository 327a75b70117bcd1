"""House rules for every notebook, and the whole sequence executed on the tiny profile."""

import json
from pathlib import Path

import nbformat
import pytest

from dasslab import runs

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def test_sequence_names():
    assert NOTEBOOKS, "no notebooks in notebooks/"
    for p in NOTEBOOKS:
        assert p.stem in runs.NOTEBOOKS, f"{p.name} is not in the sequence {runs.NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_house_rules(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    assert tagged[0] is code[0], f"{path.name}: the parameters cell must be the first code cell"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{path.name} is committed with outputs")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    params = runs.notebook_parameters(path)
    import re

    assigned = re.findall(r"^([A-Za-z_]\w*)\s*=", tagged[0].source, flags=re.M)
    unparsed = sorted(set(assigned) - set(params))
    assert not unparsed, f"{path.name}: papermill cannot parse parameter lines for {unparsed} (avoid '=' in comments)"
    for name in ("profile", "run_dir", "device"):
        assert name in params, f"{path.name}: parameters cell lacks {name!r}"
    assert params["profile"]["default"].strip("'\"") == "demo"
    # every notebook knob must be defined in every profile's table for that notebook
    knobs = set(params) - set(runs.COMMON_PARAMETERS)
    for prof in runs.available_profiles():
        table = runs.read_profile(prof).get(path.stem, {})
        missing = knobs - set(table)
        assert not missing, f"profile {prof} lacks {sorted(missing)} for {path.stem}"
    assert not [c for c in nb.cells if c.cell_type == "markdown"] == [], f"{path.name} has no narrative"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the whole sequence once on the tiny profile (data and run dir in tmp)."""
    import os

    base = tmp_path_factory.mktemp("tiny")
    old = os.environ.get("DASSLAB_DATA_ROOT")
    os.environ["DASSLAB_DATA_ROOT"] = str(base / "data")
    try:
        manifest = runs.run_notebooks("tiny", base / "run")
    finally:
        if old is None:
            os.environ.pop("DASSLAB_DATA_ROOT", None)
        else:
            os.environ["DASSLAB_DATA_ROOT"] = old
    return runs.RunDir(base / "run"), manifest


@pytest.mark.slow
def test_tiny_sequence_runs(tiny_run):
    rd, manifest = tiny_run
    assert manifest["status"] == "ok"
    for entry in manifest["notebooks"]:
        assert entry["status"] == "ok"
        assert Path(entry["executed"]).is_file()
        metrics = json.loads((rd.metrics_dir / f"{entry['notebook']}.json").read_text())
        assert metrics, f"{entry['notebook']} wrote empty metrics"


def test_readme_parameter_examples_name_real_parameters():
    """Every `-p name=...` / `--grid name=...` in the README names a parameter some notebook has."""
    import re

    from dasslab import runs

    known = set()
    for nb_path in runs.present_notebooks():
        known |= set(runs.notebook_parameters(nb_path))
    readme = (runs.project_root() / "README.md").read_text()
    used = set(re.findall(r"-p (\w+)[= ]", readme))
    for grid in re.findall(r"--grid ((?:\w+=[^\s]+\s*)+)", readme):
        used |= {g.split("=")[0] for g in grid.split()}
    used -= {"profile", "run_dir"} - known
    assert used, "the README shows no parameter examples"
    assert used <= known, f"README names unknown notebook parameters {sorted(used - known)}"
