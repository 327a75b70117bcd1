"""Comparison tables, report assembly and sweeps (on synthetic results and fake notebooks)."""

import json

import numpy as np
import pandas as pd
import pytest

from dasslab import report, runs
from tests.test_runs import write_nb


def fake_results(means: dict, spread: float = 1.0, seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for m, mu in means.items():
        for s in seeds:
            v = mu + spread * (s - 1)
            rows.append({"method": m, "seed": s, "class": "mIoU", "IoU": v})
            rows.append({"method": m, "seed": s, "class": "road", "IoU": v + 10})
            rows.append({"method": m, "seed": s, "class": "car", "IoU": v - 10})
    return pd.DataFrame(rows)


def test_comparison_table_gain_gap_and_beats():
    t = report.comparison_table(fake_results({"source_only": 20, "oracle": 60, "sgg": 40, "kpn": 20.5}))
    assert t.loc["sgg", "mIoU_mean"] == pytest.approx(40)
    assert t.loc["sgg", "mIoU_std"] == pytest.approx(1.0)
    assert t.loc["sgg", "gain_vs_source"] == pytest.approx(20)
    assert t.loc["sgg", "gap_closed"] == pytest.approx(0.5)
    assert bool(t.loc["sgg", "beats_source"]) and not bool(t.loc["kpn", "beats_source"])
    assert report.beats(t, "sgg", "kpn") and not report.beats(t, "kpn", "source_only")
    assert list(t.index)[0] == "oracle"


def test_comparison_table_needs_miou_rows():
    with pytest.raises(ValueError, match="mIoU"):
        report.comparison_table(pd.DataFrame({"method": ["a"], "seed": [0], "class": ["road"], "IoU": [1.0]}))


def test_per_class_matrix():
    mat = report.per_class_matrix(fake_results({"a": 30, "b": 50}))
    assert list(mat.columns) == ["road", "car"]
    assert mat.loc["b", "road"] == pytest.approx(60)


def test_discover_translated_lists_missing(tmp_path):
    rd = runs.RunDir(tmp_path / "run")
    d = rd.translated("sgg")
    (d / "images").mkdir(parents=True)
    (d / "images" / "a.png").write_bytes(b"x")
    runs.atomic_save_json(d / "translation.json", {"method": "sgg", "seconds_per_image": 0.5})
    t = report.discover_translated(rd).set_index("method")
    assert t.loc["sgg", "status"] == "present" and t.loc["sgg", "seconds_per_image"] == 0.5
    assert t.loc["kpn", "status"] == "missing" and t.loc["kpn", "producer"] == "05_kpn_baseline"


def test_write_report(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = runs.RunDir(tmp_path / "run")
    rd.write_metrics("01_target_diffusion", {"sdedit": {"mIoU": 31.5, "strength": 0.5}, "seconds": 12.0,
                                             "curve": [1, 2, 3]})
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    rd.save_figure(fig, "01_samples")
    out = report.write_report(rd, extra_sections=[("Comparison", "| a |\n|---|\n| 1 |")])
    md = out.read_text()
    assert "sdedit.mIoU | 31.5" in md and "figures/01_samples.png" in md
    assert "_not run in this run directory_" in md  # 02.. are absent
    html = (rd.path / "report.html").read_text()
    assert "<table>" in html and "31.5" in html


def test_parse_grid():
    assert report.parse_grid(["a=1,2", "b=x,y"]) == {"a": [1, 2], "b": ["x", "y"]}
    with pytest.raises(ValueError, match="name=v1"):
        report.parse_grid(["a"])


def test_sweep_runs_each_point(tmp_path):
    nb_dir = tmp_path / "notebooks"
    write_nb(nb_dir / "02_semantic_gradient_guidance.ipynb",
             'profile = "demo"\nrun_dir = "x"\nscale = 1\nstrength = 0.5',
             "import json, pathlib\n(pathlib.Path(run_dir)/'metrics'/'02_semantic_gradient_guidance.json')"
             ".write_text(json.dumps({'score': scale * strength}))")
    prereq = runs.RunDir(tmp_path / "base")
    (prereq.artifacts / "ddpm").mkdir()
    (prereq.translated("sdedit")).mkdir(parents=True)
    (prereq.translated("sgg")).mkdir(parents=True)
    table = report.sweep("02", {"scale": [1, 3], "strength": [0.5]}, profile="tiny",
                         base_run_dir=tmp_path / "sweep", prerequisites=prereq.path, nb_dir=nb_dir)
    assert list(table["score"]) == [0.5, 1.5] and (table["status"] == "ok").all()
    point = tmp_path / "sweep" / "scale-3_strength-0.5"
    assert (point / "artifacts" / "ddpm").is_symlink()
    assert (point / "artifacts" / "translated" / "sdedit").is_symlink()
    assert not (point / "artifacts" / "translated" / "sgg").exists()  # the swept notebook's own set
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(saved["rows"]) == 2 and np.isclose(saved["rows"][1]["score"], 1.5)


def test_md_table_and_to_uint8():
    df = pd.DataFrame({"mIoU": [40.123456, None]}, index=pd.Index(["sgg", "kpn"], name="method"))
    lines = report.md_table(df).splitlines()
    assert lines[0] == "| method | mIoU |" and lines[1] == "|---|---|"
    assert lines[2] == "| sgg | 40.12 |" and lines[3].startswith("| kpn |")
    img = np.stack([np.full((2, 3), -1.0), np.zeros((2, 3)), np.ones((2, 3))])  # CHW in [-1, 1]
    out = report.to_uint8(img)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 128, 255]
