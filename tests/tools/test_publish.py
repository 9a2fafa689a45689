"""tools/publish_weights.py: folder + catalog entry + cards, then loads through timm (local-dir and HTTP)."""
import json

import timm
import torch
from safetensors.torch import load_file

import mdeq  # noqa: F401
from mdeq.engine.checkpoint import load_checkpoint
from zoo.catalog import load_catalog

from ..zoo.server import FileServer
from .conftest import run_tool


def test_publish_then_load_from_the_folder_and_over_http(trained_run, tmp_path, monkeypatch):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.pth"
    catalog, cards, out = tmp_path / "catalog.json", tmp_path / "CARDS.md", tmp_path / "pub"
    catalog.write_text("{}")
    server = FileServer({})
    try:
        url = server.url("/mdeq_tiny_testrun.safetensors")
        extra = tmp_path / "latency.json"
        extra.write_text(json.dumps({"ms_per_image_b1": 1.25, "official_top1": 97.5}))
        proc = run_tool("publish_weights.py", [str(ckpt), "--name", "mdeq_tiny.testrun", "--url", url, "--out",
                                               str(out), "--catalog", str(catalog), "--cards", str(cards),
                                               "--extra-metrics", str(extra)],
                        cwd=tmp_path)
        assert "published mdeq_tiny.testrun" in proc.stdout
        weights = load_file(str(out / "model.safetensors"))
        trained = load_checkpoint(ckpt)["model"]
        assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in weights)
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == "mdeq_tiny" and config["num_classes"] == 10
        assert config["pretrained_cfg"]["tag"] == "testrun"
        entry = load_catalog(catalog, overlay="")["mdeq_tiny.testrun"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert entry["metrics"]["val_top1"] == metrics["val_top1"] and entry["metrics_source"] == "measured"
        assert entry["sources"] == [{"type": "url", "url": url}] and entry["stats"]["params_m"] > 0.1
        assert entry["metrics"]["ms_per_image_b1"] == 1.25 and entry["metrics"]["official_top1"] == 97.5
        card = (out / "README.md").read_text()
        assert "ms_per_image_b1" in card
        assert card.startswith("---\ntags: [image-classification, timm") and entry["sha256"] in card
        assert "## mdeq_tiny.testrun" in cards.read_text()

        monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path / "cache"))
        local = timm.create_model(f"local-dir:{out}", pretrained=True)
        assert all(torch.equal(v, weights[k]) for k, v in local.state_dict().items())
        assert local.deq.options["max_iter"] == entry["solver"]["max_iter"]  # the measured solver travels along

        server.files["/mdeq_tiny_testrun.safetensors"] = (out / "model.safetensors").read_bytes()
        monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(catalog))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        remote = timm.create_model("mdeq_tiny.testrun", pretrained=True, features_only=True)
        x = torch.randn(1, 3, 16, 16)
        local.eval()
        remote.eval()
        with torch.no_grad():
            assert torch.equal(remote(x)[-1], local.forward_intermediates(x, intermediates_only=True)[-1])
    finally:
        server.stop()


def test_publish_an_operating_point_of_k_f_evaluations(trained_run, tmp_path):
    run_dir, _ = trained_run
    catalog = tmp_path / "catalog.json"
    catalog.write_text("{}")
    run_tool("publish_weights.py", [str(run_dir / "checkpoints" / "last.pth"), "--name", "mdeq_tiny.k2", "--budget",
                                    "2", "--url", "https://example.org/k2", "--out", str(tmp_path / "o"),
                                    "--catalog", str(catalog), "--cards", str(tmp_path / "CARDS.md")], cwd=tmp_path)
    entry = load_catalog(catalog, overlay="")["mdeq_tiny.k2"]
    # the entry's default solver makes exactly 2 evaluations, and its metrics were measured so
    assert (entry["solver"]["max_iter"], entry["solver"]["tol"]) == (2, 0.0)
    assert entry["metrics"]["f_evaluations"] == 2 and entry["metrics"]["deq_nstep_mean"] <= 2
    assert "at exactly 2 f-evaluations" in entry["metrics"]["how"]
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["model_args"]["deq"]["max_iter"] == 2  # a local-dir: load uses the same operating point


def test_publish_refuses_extra_metrics_that_are_not_a_json_object_or_clash(trained_run, tmp_path):
    run_dir, _ = trained_run
    for content, message in (("[1, 2]", "expected a JSON object"), ("{not json", "not a readable JSON file"),
                             ('{"val_top1": 1.0}', "the run's own metrics")):
        (tmp_path / "m.json").write_text(content)
        proc = run_tool("publish_weights.py", [str(run_dir / "checkpoints" / "last.pth"), "--name", "mdeq_tiny.x",
                                               "--url", "https://example.org/x", "--out", str(tmp_path / "o"),
                                               "--catalog", str(tmp_path / "c.json"), "--extra-metrics",
                                               str(tmp_path / "m.json")], cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_publish_needs_a_source(trained_run, tmp_path):
    run_dir, _ = trained_run
    proc = run_tool("publish_weights.py", [str(run_dir / "checkpoints" / "last.pth"), "--name", "mdeq_tiny.x",
                                           "--out", str(tmp_path / "o"), "--catalog", str(tmp_path / "c.json")],
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "needs a source" in proc.stderr
