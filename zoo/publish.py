"""Publishing: a Hugging Face Hub style folder (model.safetensors + config.json + README.md model card),
the catalog entry, and MODEL_CARDS.md generated from the catalog. Pure file work: the caller (the
``tools/publish_weights.py`` tool) builds the model, checks the weights load, and measures it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .catalog import load_catalog, save_catalog, validate_entry
from .download import sha256_of

__all__ = ["model_card", "model_cards_markdown", "write_model_cards", "add_to_catalog", "upload_folder",
           "MODEL_CARDS_PATH", "PACKAGE_WEIGHTS"]

MODEL_CARDS_PATH = Path(__file__).resolve().parents[1] / "MODEL_CARDS.md"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"

DEFAULT_CITATION = """@inproceedings{bai2020multiscale,
  title     = {Multiscale Deep Equilibrium Models},
  author    = {Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020}
}"""


def _fmt_metrics(entry: Mapping[str, Any]) -> List[str]:
    who = "measured here" if entry["metrics_source"] == "measured" else "reported by the upstream authors"
    rows = [f"Metrics ({who}; {entry['metrics'].get('how', 'see recipe')}):", "",
            "| metric | value |", "|---|---|"]
    for k, v in entry["metrics"].items():
        if k != "how":
            rows.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return rows


def model_card(name: str, entry: Mapping[str, Any]) -> str:
    """A timm-style model card (front matter + details + usage) for one catalog entry."""
    arch, tag = name.split(".", 1)
    task = "image-segmentation" if entry.get("task") == "segmentation" else "image-classification"
    cfg = entry["pretrained_cfg"]
    stats = entry.get("stats", {})
    size = cfg["input_size"]
    solver = ", ".join(f"{k}={entry['solver'][k]}" for k in ("solver", "max_iter", "tol", "stop_mode")
                       if k in entry["solver"])
    lines = [
        "---", f"tags: [{task}, timm, deep-equilibrium]", "library_name: timm",
        f"license: {entry['license']}", f"datasets: [{entry['dataset']}]", f"pipeline_tag: {task}",
        "---", "", f"# Model card for {name}", "",
        entry.get("description") or f"A multiscale deep equilibrium (MDEQ) {arch} classifier.", "",
        "## Model Details", "",
        f"- **Model type:** {task.replace('-', ' ')} (deep equilibrium model)",
        f"- **Architecture:** `{arch}` (timm model; weights `{name}`)",
        f"- **Parameters (M):** {stats.get('params_m', 'n/a')}",
        (f"- **GMACs:** {stats['gmacs']} per image at the solver budget below ({stats['gmacs_cell']} per "
         f"application of the equilibrium cell, {stats['gmacs_rest']} for stem and head)") if "gmacs" in stats
        else "- **GMACs:** n/a",
        f"- **Image size:** {size[-2]} x {size[-1]}; preprocessing: resize/crop with crop_pct "
        f"{cfg.get('crop_pct')}, {cfg.get('interpolation', 'bilinear')} interpolation, mean {cfg.get('mean')}, "
        f"std {cfg.get('std')}",
        f"- **Classes:** {cfg['num_classes']}",
        f"- **Dataset:** {entry['dataset']}",
        f"- **Recipe:** {entry['recipe']}",
        f"- **DEQ solver used for the metrics:** {solver}",
        (f"- **Weights:** `{entry['file']}` (safetensors, sha256 `{entry['sha256']}`, {entry['size']} bytes)"
         if entry["format"] == "safetensors" else
         f"- **Weights:** the released upstream checkpoint ({entry.get('origin', entry['sources'][0].get('url'))}), "
         f"converted to `{entry['file']}` on first use; the conversion is checked by a strict load"),
        "- **Papers:** Multiscale Deep Equilibrium Models (arXiv:2006.08656)", "",
        *_fmt_metrics(entry), "",
        *_usage(name, entry), "## Citation", "", "```bibtex", entry["citation"], "```", "",
    ]
    return "\n".join(lines)


def _usage(name: str, entry: Mapping[str, Any]) -> List[str]:
    arch, tag = name.split(".", 1)
    if entry.get("task") == "segmentation":
        return ["## Model Usage", "", "### Semantic Segmentation", "", "```python", "import mdeq",
                f"seg = mdeq.create_segmentation_model('{arch}', pretrained='{tag}').eval()",
                "logits = seg.predict(images)  # (B, 19, H, W) Cityscapes trainId scores", "```", ""]
    return ["## Model Usage", "", "### Image Classification", "", "```python",
            "import timm, mdeq", f"model = timm.create_model('{name}', pretrained=True).eval()",
            "cfg = timm.data.resolve_model_data_config(model)",
            "transform = timm.data.create_transform(**cfg, is_training=False)",
            "logits = model(transform(img).unsqueeze(0))", "model.deq_stats.nstep  # solver steps per image", "```", "",
            "### Feature Map Extraction", "", "```python",
            f"features = timm.create_model('{name}', pretrained=True, features_only=True)(x)  # stem + branches",
            "```", "", "### Fine-tuning", "", "```bash",
            f"python tools/finetune.py model={arch} model.name={name} model.pretrained=true data.root=/data/mine",
            "```", ""]


def model_cards_markdown(catalog: Mapping[str, Mapping[str, Any]]) -> str:
    """MODEL_CARDS.md: a summary table and every entry's card, generated from the catalog."""
    out = ["# MDEQ model cards", "", "Generated from `zoo/catalog.json` by `tools/publish_weights.py "
           "--cards-only`; do not edit by hand (a test checks that this file matches the catalog).", "",
           "| weights | input | params (M) | top-1 | solver steps | metrics |", "|---|---|---|---|---|---|"]
    for name in sorted(catalog):
        e = catalog[name]
        size = e["pretrained_cfg"]["input_size"]
        top1 = e["metrics"].get("val_top1", e["metrics"].get("top1", "n/a"))
        steps = e["metrics"].get("deq_nstep_mean", "n/a")
        out.append(f"| `{name}` | {size[-1]} | {e.get('stats', {}).get('params_m', 'n/a')} | "
                   f"{top1 if not isinstance(top1, float) else f'{top1:.2f}'} | "
                   f"{steps if not isinstance(steps, float) else f'{steps:.1f}'} | {e['metrics_source']} |")
    out.append("")
    for name in sorted(catalog):
        card = model_card(name, catalog[name]).split("---\n", 2)[-1].strip()  # without the front matter
        card = card.replace("\n### ", "\n#### ").replace("\n## ", "\n### ")  # one level down
        out += [card.replace(f"# Model card for {name}", f"## {name}"), ""]
    return "\n".join(out).rstrip() + "\n"


def write_model_cards(catalog: Optional[Mapping] = None, path: Optional[os.PathLike] = None) -> Path:
    path = Path(path) if path else MODEL_CARDS_PATH
    path.write_text(model_cards_markdown(catalog if catalog is not None else load_catalog(overlay="")))
    return path


def add_to_catalog(name: str, folder: Path, entry: Dict[str, Any], ship: bool = False,
                   catalog_path: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """Record ``folder/model.safetensors`` as catalog entry ``name`` (sha256 and size computed here).

    ``ship=True`` copies the file into the package (``zoo/weights/``) and lists it as the first source.
    """
    weights = folder / "model.safetensors"
    entry = dict(entry, sha256=sha256_of(weights), size=weights.stat().st_size, format="safetensors")
    entry.setdefault("file", f"{name.replace('.', '_')}.safetensors")
    if ship:
        PACKAGE_WEIGHTS.mkdir(exist_ok=True)
        shutil.copyfile(weights, PACKAGE_WEIGHTS / entry["file"])
        sources = [s for s in entry.get("sources", []) if s.get("type") != "package"]
        entry["sources"] = [{"type": "package", "path": f"weights/{entry['file']}"}] + sources
    validate_entry(name, entry)
    catalog = load_catalog(catalog_path, overlay="")
    catalog[name] = entry
    save_catalog(catalog, catalog_path)
    return entry


def upload_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a published folder to the Hugging Face Hub (needs network and HF_TOKEN); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {folder.name}")
    return str(getattr(info, "commit_url", info))
