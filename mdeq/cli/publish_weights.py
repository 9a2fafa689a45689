"""Publish trained weights: a Hub-style folder, a catalog entry and the regenerated MODEL_CARDS.md.

    python tools/publish_weights.py outputs/train_cls/<run>/checkpoints/last.pth --name mdeq_tiny.digits --ship
    python tools/publish_weights.py CKPT --name mdeq_small.in1k --ema --url https://.../file --upload org/mdeq_small.in1k
    python tools/publish_weights.py CKPT --name mdeq_tiny.digits_fast --budget 1 --extra-metrics latency.json --ship
    python tools/publish_weights.py --cards-only           # regenerate MODEL_CARDS.md from the catalog

The training checkpoint is stripped to the model's weights (``--ema``: its EMA weights), loaded strictly into a
freshly built model, and saved as ``model.safetensors`` with timm's ``config.json`` and a model card
``README.md`` in ``--out`` (default ``published/<name>``). The catalog entry records sha256, size, the run's
metrics (from the run's metrics.json; with ``--budget K`` measured at exactly K f-evaluations, which become the
entry's solver setting), its solver settings and recipe; ``--ship`` puts the file inside the
package (small weights only), ``--hf-repo``/``--url`` add download sources, ``--upload`` pushes the folder.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

DATASETS = {"digits": "sklearn-digits (UCI optical recognition of handwritten digits), 80/20 stratified split"}
FORMATS = {"hfds": "a Hugging Face dataset", "wds": "WebDataset shards"}  # the card names their data.root


def model_stats(model, input_size, max_iter: int) -> dict:
    """Parameters and multiply-accumulates per image (stem+head, one cell application, at the budget)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def macs(steps: int) -> float:
        model.configure_deq(solver="unroll", max_iter=steps)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
        return counter.get_total_flops() / 2

    options = dict(model.deq.options)
    one, two = macs(1), macs(2)
    model.configure_deq(**options)
    cell, rest = two - one, 2 * one - two
    g = lambda v: round(v / 1e9, 4)  # noqa: E731
    return dict(params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3), gmacs=g(rest + max_iter * cell),
                gmacs_cell=g(cell), gmacs_rest=g(rest))


def pool_size(model, input_size) -> list:
    """Spatial size of the unpooled features at ``input_size`` (timm's pretrained-cfg ``pool_size``)."""
    import torch

    with torch.no_grad():
        return list(model.eval().forward_features(torch.zeros(1, *input_size)).shape[-2:])


def refresh_stats(catalog_path=None) -> None:
    """Fill ``stats`` (parameters, GMACs) of entries without it, from the architecture alone (no download)."""
    import timm

    import mdeq
    from zoo.catalog import load_catalog, save_catalog

    catalog = load_catalog(catalog_path, overlay="")
    for name, entry in catalog.items():
        if entry.get("stats"):
            continue
        arch, cfg = name.split(".", 1)[0], entry["pretrained_cfg"]
        args = dict(entry.get("model_args") or {}, num_classes=cfg["num_classes"], deq=entry["solver"])
        if entry.get("task") == "segmentation":
            model = mdeq.create_segmentation_model(arch, **args)
        else:
            model = timm.create_model(arch, **args)
        entry["stats"] = model_stats(model.eval(), tuple(cfg["input_size"]), int(entry["solver"]["max_iter"]))
        print(f"{name}: {entry['stats']}")
    save_catalog(catalog, catalog_path)


def measure_at_budget(checkpoint, model, k: int, ema: bool) -> dict:
    """Configure ``model`` for exactly ``k`` f-evaluations and measure it on the run's val split (eval_cls's job)."""
    import tempfile

    from mdeq.core import budget_options
    from mdeq.engine.classification_eval import evaluate_classification_source
    from mdeq.engine.distributed import DistEnv

    changes = budget_options(model.deq.options, k)
    model.configure_deq(**changes)
    with tempfile.TemporaryDirectory() as tmp:
        res = evaluate_classification_source(str(checkpoint), DistEnv(), Path(tmp), use_ema=ema,
                                             solver_changes=changes, workers=0, progress=False, say=lambda *a: None)
    return {"val_top1": res["top1"], "val_top5": res["top5"], "deq_nstep_mean": res["deq_nstep_mean"],
            "deq_rel_residual_mean": res["deq_rel_residual_mean"], "val_images": res["images"], "f_evaluations": k,
            "how": f"tools/eval_cls.py on the run's val split ({res['images']} images) at exactly {k} "
                   f"f-evaluation{'s' if k != 1 else ''} per image (the solver below)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (checkpoints/last.pth or best.pth)")
    p.add_argument("--name", help="catalog key arch.tag, e.g. mdeq_tiny.digits")
    p.add_argument("--ema", action="store_true", help="publish the EMA weights")
    p.add_argument("--out", type=Path, help="output folder (default published/<name>)")
    p.add_argument("--ship", action="store_true", help="copy the weights into the package (zoo/weights/)")
    p.add_argument("--hf-repo", help="Hugging Face Hub repo id to list as a source")
    p.add_argument("--url", help="HTTPS URL to list as a source")
    p.add_argument("--upload", metavar="REPO_ID", help="upload the folder to this Hub repo (needs network)")
    p.add_argument("--description", default="")
    p.add_argument("--budget", type=int, metavar="K",
                   help="publish the operating point of exactly K f-evaluations: the entry's solver is the run's at K "
                        "(mdeq.core.budget_options), and its metrics are measured at K on the run's val split")
    p.add_argument("--extra-metrics", type=Path, metavar="JSON",
                   help="a JSON object of further measurements to record with the run's metrics (e.g. latency and "
                        "the official setting's numbers from tools/benchmark.py budget); its keys must be new")
    p.add_argument("--catalog", type=Path, help="catalog file to update (default zoo/catalog.json)")
    p.add_argument("--cards", type=Path, help="MODEL_CARDS.md to regenerate (default: the project's)")
    p.add_argument("--cards-only", action="store_true", help="only regenerate MODEL_CARDS.md")
    p.add_argument("--refresh-stats", action="store_true",
                   help="compute parameters and GMACs of catalog entries that lack them, then regenerate the cards")
    args = p.parse_args(argv)

    from zoo.catalog import load_catalog
    from zoo.publish import DEFAULT_CITATION, add_to_catalog, model_card, upload_folder, write_model_cards

    if args.refresh_stats:
        refresh_stats(args.catalog)
    if args.cards_only or args.refresh_stats:
        print(f"wrote {write_model_cards(load_catalog(args.catalog, overlay=''), args.cards)}")
        return 0
    if not args.checkpoint or not args.name:
        p.error("CHECKPOINT and --name are required (or --cards-only)")
    if not (args.ship or args.hf_repo or args.url):
        p.error("the entry needs a source: --ship, --hf-repo or --url")
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    import mdeq  # noqa: F401
    from mdeq.cli.common import reported_errors
    from mdeq.engine.checkpoint import load_checkpoint
    from mdeq.engine.model_config import is_mdeq_name
    from mdeq.engine.rebuild import model_from_checkpoint, require_training_checkpoint

    with reported_errors():  # not a training checkpoint: the file, what it is and what is accepted
        ckpt = load_checkpoint(args.checkpoint)
        require_training_checkpoint(ckpt, str(args.checkpoint))
    ident, cfg = ckpt["identity"], ckpt["config"]
    if not is_mdeq_name(ident["arch"]):
        p.error(f"the checkpoint holds {ident['arch']}, which is not an MDEQ preset: the zoo's catalog and model cards "
                "are for MDEQ weights (timm.models.push_to_hf_hub publishes any timm model)")
    arch = args.name.split(".", 1)[0]
    if arch != ident["arch"]:
        p.error(f"--name {args.name} names {arch} but the checkpoint holds {ident['arch']}")
    if args.ema and ckpt.get("model_ema") is None:
        p.error("the checkpoint has no EMA weights")
    # what we publish loads strictly, in the run's evaluation settings
    model = model_from_checkpoint(ckpt, use_ema=args.ema, where=str(args.checkpoint)).model
    if args.budget is not None and args.budget < 1:
        p.error(f"--budget is a number of f-evaluations >= 1, got {args.budget}")
    budget_metrics = measure_at_budget(args.checkpoint, model, args.budget, args.ema) if args.budget else None
    data_cfg = dict(ckpt["data_cfg"])
    out = args.out or Path("published") / args.name
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "arch": arch, "source": "mdeq-zoo"})
    arch_args = {k: v for k, v in ident["model_kwargs"].items() if k != "deq"}  # architecture fields
    model_args = dict(arch_args, num_classes=ident["num_classes"],
                      deq=dict(model.deq.options))  # local-dir:/hf-hub: loads get the measured solver too
    save_config_for_hf(model, str(out / "config.json"), model_args=model_args,
                       model_config=dict(pretrained_cfg=dict(architecture=arch, tag=args.name.split(".", 1)[1])),
                       data_config={k: data_cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean",
                                                             "std") if k in data_cfg})
    run_metrics = Path(args.checkpoint).resolve().parents[1] / "metrics.json"
    metrics = {}
    if run_metrics.is_file():
        m = json.loads(run_metrics.read_text())
        key = "val_ema_" if args.ema else "val_"
        metrics = {"val_top1": m.get(f"{key}top1"), "val_top5": m.get(f"{key}top5"),
                   "deq_nstep_mean": m["deq_nstep_mean"], "deq_rel_residual_mean": m["deq_rel_residual_mean"],
                   "val_images": m["val_count"],
                   "how": f"tools/train_cls.py final validation ({m['val_count']} images, the solver below)"}
    if budget_metrics is not None:
        metrics = budget_metrics
    if args.extra_metrics:
        try:
            extra = json.loads(args.extra_metrics.read_text())
        except (OSError, ValueError) as err:
            p.error(f"--extra-metrics {args.extra_metrics}: not a readable JSON file ({err})")
        if not isinstance(extra, dict):
            p.error(f"--extra-metrics {args.extra_metrics}: expected a JSON object of name: value, got "
                    f"{type(extra).__name__}")
        clash = sorted(set(extra) & set(metrics))
        if clash:
            p.error(f"--extra-metrics {args.extra_metrics}: {clash} are the run's own metrics; use new names")
        metrics.update(extra)
    solver = dict(model.deq.options)  # the full DEQ options: models built from the entry use exactly these
    sources = ([{"type": "hf", "repo_id": args.hf_repo, "filename": "model.safetensors"}] if args.hf_repo else []) + (
        [{"type": "url", "url": args.url}] if args.url else [])
    data_name = cfg["data"].get("name", "imagefolder")
    dataset = (f"{cfg['data'].get('root')} ({FORMATS[data_name]})" if data_name in FORMATS
               else DATASETS.get(data_name, data_name))
    entry = dict(
        description=args.description or f"{arch} trained with mdeq-zoo's {cfg.get('recipe') or 'custom'} recipe.",
        sources=sources, license="mit", dataset=dataset,
        recipe=f"tools/train_cls.py experiment={cfg.get('recipe')}" if cfg.get("recipe") else "tools/train_cls.py",
        metrics=metrics, metrics_source="measured", solver=solver,
        pretrained_cfg=dict(input_size=list(data_cfg["input_size"]), pool_size=pool_size(model, data_cfg["input_size"]),
                            crop_pct=data_cfg.get("crop_pct"),
                            interpolation=data_cfg.get("interpolation"), mean=list(data_cfg["mean"]),
                            std=list(data_cfg["std"]), num_classes=ident["num_classes"],
                            label_names=list(ckpt.get("classes") or [])),
        stats=model_stats(model, tuple(data_cfg["input_size"]), int(solver["max_iter"])),
        citation=DEFAULT_CITATION,
        **({"model_args": arch_args} if arch_args else {}),
    )
    entry = add_to_catalog(args.name, out, entry, ship=args.ship, catalog_path=args.catalog)
    (out / "README.md").write_text(model_card(args.name, entry))
    cards = write_model_cards(load_catalog(args.catalog, overlay=""), args.cards)
    print(f"published {args.name}: {out} (sha256 {entry['sha256']}), catalog updated, {cards} regenerated")
    if args.upload:
        print(f"uploaded: {upload_folder(out, args.upload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
