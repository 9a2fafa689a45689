"""C-DEQ end to end: train a digits classifier, distil a student from it, evaluate the student with eval_cls."""
import json

import pytest

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import run_tool


@pytest.mark.slow
def test_distill_then_eval_cls_uses_the_consistency_solver(digits_small, distill_teacher, tmp_path):
    teacher = distill_teacher
    out = tmp_path / "distill"
    proc = run_tool("distill.py", [str(teacher / "checkpoints" / "last.pth"), "--data-root", str(digits_small),
                                   "--teacher-steps", "4", "--epochs", "2", "--batch-size", "10", "--eval-iters", "1",
                                   "2", "--workers", "0", "--output", str(out), "--no-progress"], cwd=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["val_top1_student"]) == {"1", "2"} and set(m["val_top1_teacher"]) == {"1", "2", "converged"}
    assert m["teacher_steps"] == 4 and len(m["history"]) == 2 and m["default_student_steps"] == 1
    assert "f-evals  student top-1  teacher top-1" in proc.stdout
    ck = load_checkpoint(out / "distilled.pth")
    assert ck["identity"]["model_kwargs"]["student"] is True and ck["config"]["deq"]["solver"] == "consistency"
    assert int(ck["model"]["fullstage.student.train_steps"]) == 4
    res = json.loads((_eval(out / "distilled.pth", digits_small, tmp_path / "ev") / "eval.json").read_text())
    assert res["solver"]["solver"] == "consistency" and res["solver"]["max_iter"] == 1
    assert res["top1"] == pytest.approx(m["val_top1_student"]["1"], abs=1e-6)
    # publishable like any weights: the Hub-style folder loads with timm and runs the student
    import shutil

    import timm
    import torch

    import mdeq  # noqa: F401

    catalog = tmp_path / "catalog.json"
    shutil.copy(mdeq_catalog(), catalog)
    run_tool("publish_weights.py", [str(out / "distilled.pth"), "--name", "mdeq_tiny.digits_cdeq_test", "--url",
                                    "https://example.org/w.safetensors", "--catalog", str(catalog), "--cards",
                                    str(tmp_path / "CARDS.md"), "--out", str(tmp_path / "pub")], cwd=tmp_path)
    model = timm.create_model(f"local-dir:{tmp_path / 'pub'}", pretrained=True).eval()
    assert model.deq.options["solver"] == "consistency" and model.fullstage.student.num_train_steps == 4
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert model.deq_stats.nstep.tolist() == [1, 1]
    # the teacher's weights are untouched: only the student was trained
    before, after = load_checkpoint(teacher / "checkpoints" / "last.pth")["model"], ck["model"]
    assert all(before[k].equal(after[k]) for k in before)


def mdeq_catalog():
    from zoo.catalog import CATALOG_PATH

    return CATALOG_PATH


def _eval(source, root, out):
    run_tool("eval_cls.py", [str(source), "--data-root", str(root), "--output", str(out), "--no-progress",
                             "--workers", "0"], cwd=out.parent)
    return out
