"""The weights catalog: one entry per published weight set, keyed ``arch.tag``, with a schema check.

An entry (``zoo/catalog.json``)::

    "mdeq_tiny.digits": {
      "file": "mdeq_tiny_digits.safetensors",          # name of the verified file in the cache
      "sha256": "<64 hex>", "size": 635912,            # of that file
      "format": "safetensors",                          # or "official": an upstream checkpoint to convert
      "sources": [                                      # tried in this order
        {"type": "package", "path": "weights/mdeq_tiny_digits.safetensors"},
        {"type": "hf", "repo_id": "org/mdeq_tiny.digits", "filename": "model.safetensors", "revision": "main"},
        {"type": "url", "url": "https://.../mdeq_tiny_digits-1a2b3c4d.safetensors"}
      ],
      "license": "mit", "dataset": "...", "recipe": "experiment=digits_tiny",
      "metrics": {...}, "metrics_source": "measured" | "reported",   "solver": {...},
      "pretrained_cfg": {...timm data config: input_size, mean, std, crop_pct, interpolation, num_classes},
      "model_args": {"skip_init": true},                # optional: architecture fields beyond the preset's
      "citation": "..."
    }

``solver`` holds the DEQ settings the metrics were measured with (``mdeq.core.DEQ`` option names); a model built
from the entry starts with them. ``model_args`` holds architecture fields (``MDEQConfig``) the weights need
beyond the preset, such as the Skip DEQ predictor or the C-DEQ student.

Released upstream checkpoints have ``"format": "official"``: their source is the original ``.pkl``, converted
on first use (by the caller's converter, see ``zoo.download.fetch``) and cached as safetensors. Their
``sha256``/``size`` (of the converted file) may be null until known; ``upstream_sha256`` pins the original file
when known. ``task`` is ``classification`` (default) or ``segmentation``.

``MDEQ_ZOO_CATALOG=<path>`` overlays a second JSON file of entries (a mirror, tests, private weights).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["CatalogError", "CATALOG_PATH", "load_catalog", "validate_entry", "save_catalog"]

CATALOG_PATH = Path(__file__).with_name("catalog.json")
SOURCE_TYPES = {"package": ("path",), "hf": ("repo_id", "filename"), "url": ("url",)}
FORMATS = ("safetensors", "official")
REQUIRED = ("file", "sha256", "size", "format", "sources", "license", "dataset", "recipe", "metrics",
            "metrics_source", "solver", "pretrained_cfg", "citation")
_NAME = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CatalogError(ValueError):
    """A catalog entry is malformed (the message names the entry and the field)."""


def validate_entry(name: str, entry: Any) -> None:
    """Raise ``CatalogError`` unless ``entry`` follows the schema in this module's docstring."""
    def bad(msg: str) -> CatalogError:
        return CatalogError(f"catalog entry {name!r}: {msg}")

    if not _NAME.match(name):
        raise bad("the key must be 'arch.tag' in lower case (e.g. 'mdeq_tiny.digits')")
    if not isinstance(entry, Mapping):
        raise bad(f"expected an object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise bad(f"missing fields {missing}")
    if entry["format"] not in FORMATS:
        raise bad(f"format must be one of {FORMATS}, got {entry['format']!r}")
    official = entry["format"] == "official"
    for key in ("sha256", "upstream_sha256"):
        sha = entry.get(key)
        if (key == "sha256" and not official) or sha is not None:
            if not isinstance(sha, str) or not _HEX64.match(sha):
                raise bad(f"{key} must be 64 lower-case hex digits")
    size = entry["size"]
    if not (official and size is None) and (not isinstance(size, int) or size < 0):
        raise bad("size must be a number of bytes (integer >= 0)")
    if entry.get("task", "classification") not in ("classification", "segmentation"):
        raise bad("task must be 'classification' or 'segmentation'")
    if not isinstance(entry["file"], str) or "/" in entry["file"] or not entry["file"]:
        raise bad("file must be a plain file name")
    sources = entry["sources"]
    if not isinstance(sources, list) or not sources:
        raise bad("sources must be a non-empty list")
    for i, src in enumerate(sources):
        if not isinstance(src, Mapping) or src.get("type") not in SOURCE_TYPES:
            raise bad(f"sources[{i}] must be an object with type one of {sorted(SOURCE_TYPES)}")
        lacking = [k for k in SOURCE_TYPES[src["type"]] if not src.get(k)]
        if lacking:
            raise bad(f"sources[{i}] ({src['type']}) lacks {lacking}")
        if src["type"] == "url" and not str(src["url"]).startswith(("https://", "http://")):
            raise bad(f"sources[{i}].url must be an http(s) URL")
    if entry["metrics_source"] not in ("measured", "reported"):
        raise bad("metrics_source must be 'measured' (here) or 'reported' (by the upstream authors)")
    if not isinstance(entry["metrics"], Mapping) or not isinstance(entry["solver"], Mapping):
        raise bad("metrics and solver must be objects")
    cfg = entry["pretrained_cfg"]
    if not isinstance(cfg, Mapping) or not {"input_size", "num_classes"} <= set(cfg):
        raise bad("pretrained_cfg must hold at least input_size and num_classes")
    args = entry.get("model_args", {})
    if not isinstance(args, Mapping) or "deq" in args or "num_classes" in args:
        raise bad("model_args must be an object of architecture fields (the DEQ settings go in 'solver', the "
                  "classes in pretrained_cfg)")


def load_catalog(path: Optional[os.PathLike] = None, overlay: Optional[os.PathLike] = None) -> Dict[str, Dict]:
    """The validated catalog; entries of ``overlay`` (default ``$MDEQ_ZOO_CATALOG``) replace or add entries."""
    entries: Dict[str, Dict] = {}
    overlay = overlay if overlay is not None else os.environ.get("MDEQ_ZOO_CATALOG") or None
    for p in [Path(path) if path else CATALOG_PATH] + ([Path(overlay)] if overlay else []):
        try:
            data = json.loads(Path(p).read_text())
        except FileNotFoundError:
            raise CatalogError(f"catalog file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise CatalogError(f"catalog file {p} is not valid JSON: {e}") from None
        if not isinstance(data, Mapping):
            raise CatalogError(f"catalog file {p} must hold an object keyed 'arch.tag'")
        for name, entry in data.items():
            validate_entry(name, entry)
            entries[name] = dict(entry)
    return entries


def save_catalog(entries: Mapping[str, Mapping], path: Optional[os.PathLike] = None) -> Path:
    """Validate and write the catalog (sorted keys, atomically)."""
    for name, entry in entries.items():
        validate_entry(name, entry)
    path = Path(path) if path else CATALOG_PATH
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({k: entries[k] for k in sorted(entries)}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
