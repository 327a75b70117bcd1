"""Progressive translation learning on tiny random models: order, resume, checkpoints, validation."""

import json

import pytest
import torch

from dasslab import runs, seg
from dasslab.diffusion import ptl, sgg

from .test_sgg import ListSet, tiny_scheduler, tiny_unet


def test_depths_must_increase():
    assert ptl.check_depths([0.2, 0.4, 0.6]) == [0.2, 0.4, 0.6]
    for bad, msg in (
        ([0.4, 0.4], "strictly increasing"),
        ([0.5, 0.3], "strictly increasing"),
        ([], "at least one"),
        ([0.2, 1.5], r"\(0, 1\]"),
        ([0.0, 0.3], r"\(0, 1\]"),
    ):
        with pytest.raises(ValueError, match=msg):
            ptl.check_depths(bad)


@pytest.fixture()
def setup(tmp_path):
    torch.set_num_threads(1)
    rd = runs.RunDir(tmp_path / "run")
    runs.seed_everything(0)
    g0 = seg.build_segmenter("unet-small", 19, width=4, depth=2)
    tc = seg.TrainConfig(iters=2, batch_size=2, amp=False, seed=0)
    cfg = sgg.SGGConfig(lambda_lcg=2.0, lambda_gsg=2.0, guide_input="x0")
    return rd, tiny_unet(), tiny_scheduler(), g0, ListSet(4), tc, cfg


def _run(setup, depths, **kw):
    rd, unet, sched, g0, ds, tc, cfg = setup
    return ptl.run_ptl(
        rd, unet, sched, g0, ds, depths, cfg, tc, batch_size=2, progress=False, device="cpu", **kw
    )


def test_stages_run_in_order_with_a_new_guide_each(setup):
    calls = []

    def eval_fn(s, guide, translated):
        calls.append((s, len(translated)))
        return {"n": len(translated)}

    rd = setup[0]
    res = _run(setup, [0.2, 0.3, 0.4], eval_fn=eval_fn, final_dir=rd.translated("sgg_ptl"), stage_limit=3)
    assert [r["stage"] for r in res.stages] == [1, 2, 3]
    assert [r["depth"] for r in res.stages] == [0.2, 0.3, 0.4]
    assert calls == [(1, 3), (2, 3), (3, 4)]  # intermediate stages on a subset, the last on all
    # each stage's translations were made at its own depth, guided by the previous stage's guide
    ids = [ptl._guide_id(setup[3])] + [r["guide_id"] for r in res.stages]
    assert len(set(ids)) == 4, "every stage must fine-tune into a new guide"
    for r, prev in zip(res.stages, ids[:-1]):
        rec = json.loads(
            (rd.artifacts / "ptl" / f"stage{r['stage']}" / "translated" / "translation.json").read_text()
        )
        assert rec["strength"] == r["depth"] and rec["params"]["guide"] == prev
    dirs = {r["guide_dir"] for r in res.stages}
    assert len(dirs) == 3 and all(
        (rd.segmenter_dir(f"ptl-guide-stage{s}") / "model.safetensors").is_file() for s in (1, 2, 3)
    )
    assert res.table()["n"].tolist() == [3, 3, 4]
    final = json.loads((rd.translated("sgg_ptl") / "translation.json").read_text())
    assert final["method"] == "sgg_ptl" and final["ptl"]["stages"] == [0.2, 0.3, 0.4]
    assert sorted(p.name for p in (rd.translated("sgg_ptl") / "images").iterdir()) == [
        f"img{i:02d}.png" for i in range(4)
    ]


def test_resume_skips_finished_stages(setup, monkeypatch):
    first = _run(setup, [0.2, 0.3])
    assert not any(r["resumed"] for r in first.stages)
    stamps = [(setup[0].artifacts / "ptl" / f"stage{s}" / "stage.json").stat().st_mtime_ns for s in (1, 2)]

    translated = []
    real = sgg.translate_dataset_sgg

    def spy(*a, **kw):
        translated.append(a[5].strength)
        return real(*a, **kw)

    monkeypatch.setattr(sgg, "translate_dataset_sgg", spy)
    again = _run(setup, [0.2, 0.3])
    assert all(r["resumed"] for r in again.stages) and translated == []
    assert [r["guide_id"] for r in again.stages] == [r["guide_id"] for r in first.stages]
    # a longer schedule runs only the new stage
    longer = _run(setup, [0.2, 0.3, 0.4])
    assert [r["resumed"] for r in longer.stages] == [True, True, False] and translated == [0.4]
    assert [
        (setup[0].artifacts / "ptl" / f"stage{s}" / "stage.json").stat().st_mtime_ns for s in (1, 2)
    ] == stamps
    # changing K_2 keeps stage 1 and recomputes every stage after it
    translated.clear()
    changed = _run(setup, [0.2, 0.35, 0.4])
    assert [r["resumed"] for r in changed.stages] == [True, False, False] and translated == [0.35, 0.4]


def test_interrupted_stage_is_recomputed(setup, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(seg, "get_or_train", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(setup, [0.2])
    assert not (setup[0].artifacts / "ptl" / "stage1" / "stage.json").exists()
    monkeypatch.undo()
    res = _run(setup, [0.2])
    assert res.stages[0]["resumed"] is False


def test_run_ptl_rejects_bad_depths(setup):
    with pytest.raises(ValueError, match="strictly increasing"):
        _run(setup, [0.3, 0.2])


def test_cli_registers():
    from dasslab import cli

    args = cli.build_parser().parse_args(["ptl", "--run-dir", "x", "--strengths", "0.2", "0.4"])
    assert args.func is ptl._cmd_ptl and args.strengths == [0.2, 0.4]


def test_from_chapter02_reads_the_setting_and_guide_of_notebook_02(setup):
    rd, _, sched, g0, *_ = setup
    with pytest.raises(FileNotFoundError, match="02_semantic_gradient_guidance"):
        ptl.from_chapter02(rd, sched)
    seg.save_segmenter(g0, rd.segmenter_dir("sgg-guide-x0"))
    setting = sgg.SGGConfig(strength=0.6, lambda_lcg=0.5, lambda_gsg=0.25)
    guide = {"input": "x0", "t_max": 20, "photometric": 1.0, "adv_eps": 0.3, "adv_steps": 2,
             "segmenter_dir": str(rd.segmenter_dir("sgg-guide-x0"))}
    rd.write_metrics(sgg.NOTEBOOK, {"settings": setting.to_dict(), "guide": guide, "seed": 3, "batch_size": 7})
    ch = ptl.from_chapter02(rd, sched, device="cpu")
    assert ch.sgg == setting and (ch.seed, ch.batch_size) == (3, 7)
    assert ptl._guide_id(ch.guide0) == ptl._guide_id(g0)
    # the stages fine-tune with g_0's own loss: the same jitter and adversarial training
    assert isinstance(ch.loss_fn, sgg.GuideLoss)
    assert (ch.loss_fn.photometric, ch.loss_fn.adv_eps, ch.loss_fn.adv_steps) == (1.0, 0.3, 2)
    assert ch.loss_extra["adv_eps"] == 0.3


def test_finetune_last_false_skips_the_last_fine_tuning_and_resumes(setup):
    rd = setup[0]
    res = _run(setup, [0.2, 0.3], root=rd.artifacts / "ab", name="ab", finetune_last=False)
    assert len(res.guides) == 1 and res.stages[-1]["guide_id"] is None
    assert not (rd.segmenter_dir("ab-guide-stage2") / "model.safetensors").exists()
    assert (rd.segmenter_dir("ab-guide-stage1") / "model.safetensors").is_file()
    again = _run(setup, [0.2, 0.3], root=rd.artifacts / "ab", name="ab", finetune_last=False)
    assert [r["resumed"] for r in again.stages] == [True, True]
    assert ptl._guide_id(again.guides[-1]) == ptl._guide_id(res.guides[-1])
    # asking for the last fine-tuning later redoes the last stage only
    full = _run(setup, [0.2, 0.3], root=rd.artifacts / "ab", name="ab")
    assert [r["resumed"] for r in full.stages] == [True, False] and len(full.guides) == 2
