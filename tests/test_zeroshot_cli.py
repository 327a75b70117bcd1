"""``dasslab zodi-transfer`` and ``dasslab zodi-adapt`` end to end on a tiny ToyStreets profile."""
from __future__ import annotations

import json

import pytest

from dasslab import cli, toystreets

PROFILE = """
description = "zodi cli test"
[data]
dataset = "toystreets"
root = "{root}"
size = [32, 64]
n_train = 6
n_val = 4
seed = 0
conditions = ["night", "fog"]
[seg]
model = "unet-small"
model_kwargs = {{ width = 4, depth = 2 }}
iters = 2
batch_size = 4
lr = 1e-3
weight_decay = 0.0
seeds = [0]
["04_zero_shot_zodi"]
backend = "embedded"
conditions = ["night", "fog"]
eval_conditions = ["night"]
prompts = {{ night = "driving at night", fog = "driving in fog" }}
strengths = {{ night = 0.9, fog = 0.6 }}
num_inference_steps = 3
guidance_scale = 2.0
transfer_batch = 8
lambda_sim = 0.1
seeds = []
seg_iters = 0
cache_dir = "{cache}"
["04_zero_shot_zodi".embedded]
channels = [8, 16]
n_corpus = 10
iters = 3
batch_size = 4
ckpt_every = 0
"""


def test_cli_transfer_then_adapt(tmp_path, capsys):
    root = tmp_path / "toy"
    toystreets.generate(root, (32, 64), n_train=6, n_val=4, seed=0, conditions=("night", "fog"), progress=False)
    prof = tmp_path / "zodi.toml"
    prof.write_text(PROFILE.format(root=root, cache=tmp_path / "cache"))
    run = tmp_path / "run"
    parser = cli.build_parser()
    assert "zodi-transfer" in parser.format_help() and "zodi-adapt" in parser.format_help()

    # adapting before transferring names the notebook to run first
    assert cli.main(["zodi-adapt", "--profile", str(prof), "--run-dir", str(run), "--device", "cpu"]) == 2
    assert "04_zero_shot_zodi" in capsys.readouterr().err

    assert cli.main(["zodi-transfer", "--profile", str(prof), "--run-dir", str(run), "--device", "cpu",
                     "--conditions", "night", "--prompt", "a street at night, raining", "--strength", "0.8"]) == 0
    rec = json.loads((run / "artifacts/translated/zodi_night/translation.json").read_text())
    assert rec["params"]["prompt"] == "a street at night, raining" and rec["params"]["strength"] == 0.8
    assert len(list((run / "artifacts/translated/zodi_night/images").glob("*.png"))) == 6
    assert list((tmp_path / "cache").glob("embedded-*/config.json"))  # generator cached outside the run

    assert cli.main(["zodi-adapt", "--profile", str(prof), "--run-dir", str(run), "--device", "cpu",
                     "--variants", "source-only", "zodi"]) == 0
    out = capsys.readouterr().out
    assert "zodi" in out and "source-only" in out
    summary = json.loads((run / "metrics/zodi_adapt_cli.json").read_text())["summary"]
    assert {r["method"] for r in summary} == {"source-only", "zodi"}

    with pytest.raises(SystemExit):
        cli.main(["zodi-transfer", "--backend", "dall-e"])
    assert cli.main(["zodi-transfer", "--profile", str(prof), "--run-dir", str(run), "--prompt", "x"]) == 2
    assert "one --conditions" in capsys.readouterr().err
