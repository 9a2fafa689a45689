"""The catalog's schema check, the shipped entry, and MODEL_CARDS.md kept in sync with the catalog."""
import copy
import json

import pytest

from zoo.catalog import CatalogError, load_catalog, validate_entry
from zoo.download import PACKAGE_ROOT, sha256_of
from zoo.publish import MODEL_CARDS_PATH, model_cards_markdown


@pytest.fixture
def entry():
    return copy.deepcopy(load_catalog(overlay="")["mdeq_tiny.digits"])


def test_the_shipped_entry_is_valid_and_its_file_matches(entry):
    src = entry["sources"][0]
    assert src["type"] == "package"
    path = PACKAGE_ROOT / src["path"]
    assert sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["size"]
    assert entry["metrics_source"] == "measured" and entry["metrics"]["val_top1"] >= 90.0
    assert entry["pretrained_cfg"]["num_classes"] == 10 and entry["solver"]["solver"] == "anderson"


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("sha256"), r"missing fields \['sha256'\]"),
    (lambda e: e.update(sha256="abc"), "sha256 must be 64 lower-case hex digits"),
    (lambda e: e.update(format="pickle"), "format must be one of"),
    (lambda e: e.update(sources=[]), "sources must be a non-empty list"),
    (lambda e: e.update(sources=[{"type": "ftp", "url": "ftp://x"}]), r"sources\[0\] must be an object with type"),
    (lambda e: e.update(sources=[{"type": "url", "url": "file:///etc/passwd"}]), r"sources\[0\].url must be an http"),
    (lambda e: e.update(sources=[{"type": "hf", "repo_id": "org/x"}]), r"sources\[0\] \(hf\) lacks \['filename'\]"),
    (lambda e: e.update(metrics_source="guessed"), "metrics_source must be 'measured'"),
    (lambda e: e.update(file="../escape.safetensors"), "file must be a plain file name"),
    (lambda e: e["pretrained_cfg"].pop("num_classes"), "pretrained_cfg must hold at least"),
])
def test_malformed_entries_are_rejected_with_the_field_named(entry, change, message):
    change(entry)
    with pytest.raises(CatalogError, match=message) as err:
        validate_entry("mdeq_tiny.digits", entry)
    assert "'mdeq_tiny.digits'" in str(err.value)


def test_bad_keys_and_files(entry, tmp_path):
    with pytest.raises(CatalogError, match="must be 'arch.tag'"):
        validate_entry("MDEQ-tiny", entry)
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog(overlay=bad)
    bad.write_text(json.dumps({"mdeq_tiny.x": {"file": "a"}}))
    with pytest.raises(CatalogError, match="'mdeq_tiny.x': missing fields"):
        load_catalog(overlay=bad)


def test_model_cards_md_matches_the_catalog():
    expected = model_cards_markdown(load_catalog(overlay=""))
    assert MODEL_CARDS_PATH.read_text() == expected, (
        "MODEL_CARDS.md is out of date: run python tools/publish_weights.py --cards-only")
    assert "## mdeq_tiny.digits" in expected and "measured here" in expected
