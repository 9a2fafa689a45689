"""Evaluate an MDEQ segmentation model: dataset-level confusion matrix, mIoU and per-class IoU, solver steps.

    python tools/eval_seg.py outputs/train_seg/<run>/checkpoints/best.pth        # its own data and settings
    python tools/eval_seg.py mdeq_small.cityscapes_official --data-root /data/cityscapes
    python tools/eval_seg.py MDEQ_Small_Seg.pkl --data-root /data/cityscapes --mode slide --window 1024 1024
    python tools/eval_seg.py best.pth --data-root /data/cityscapes --scales 0.5 0.75 1 1.25 1.5 1.75 --flip
    python tools/eval_seg.py best.pth --data-root /data/cityscapes --split test --save-predictions preds/
    torchrun --nproc_per_node=4 tools/eval_seg.py best.pth --data-root /data/cityscapes

The source is a ``train_seg`` checkpoint, a weights file (safetensors, a state dict, or a released official
MDEQ Cityscapes checkpoint, converted on the fly; the preset is inferred unless --model is given) or a
published tag. mIoU is the mean over classes of IoU = TP / (TP + FP + FN) from one confusion matrix over
the whole split; a class absent from both the labels and the predictions is left out of the mean (n/a).
``--save-predictions DIR`` writes one PNG per image under DIR/<city>/<image name>.png: Cityscapes labelIds
(what the official evaluation server takes) for Cityscapes data, class indices for other datasets.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="train_seg checkpoint, weights file, or published tag (mdeq_small.<tag>)")
    p.add_argument("--dataset", choices=["cityscapes", "folder", "synthetic"],
                   help="dataset layout (default: the checkpoint's, else cityscapes)")
    p.add_argument("--data-root", help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="val")
    p.add_argument("--classes", nargs="+", help="class names of a folder dataset (default: <root>/classes.txt)")
    p.add_argument("--label-type", choices=["auto", "labelIds", "labelTrainIds"],
                   help="Cityscapes label files (default: the run's, else auto: labelTrainIds when present)")
    p.add_argument("--no-labels", action="store_true",
                   help="the split has no labels (predictions only); implied for Cityscapes' test split")
    p.add_argument("--model", help="preset of a bare weights file (default: inferred from the shapes)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="inference mode (default: the run's, "
                   "else whole)")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), help="sliding window size")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="sliding window stride (default: window)")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale factors, e.g. 0.5 0.75 1 1.25 1.5 1.75")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add horizontally flipped passes (default: the run's setting, else no)")
    p.add_argument("--solver", help="forward solver: anderson | broyden | fixed_point | unroll")
    p.add_argument("--f-thres", type=int, help="forward iteration cap")
    p.add_argument("--tol", type=float)
    p.add_argument("--stop-mode", choices=["abs", "rel"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (the solver stays in float32)")
    p.add_argument("--save-predictions", metavar="DIR", help="write the predicted label PNGs here")
    p.add_argument("--output", help="folder for eval.json / iou.md (default: outputs/eval_seg/<time>)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mdeq  # noqa: F401
    from mdeq.engine.distributed import init_distributed, shutdown_distributed

    env = init_distributed(args.device)
    try:
        return _evaluate(args, env)
    finally:
        shutdown_distributed()


def _inference_cfg(args, run_cfg):
    cfg = dict((run_cfg or {}).get("inference") or {})
    for key, value in (("mode", args.mode), ("window", args.window), ("stride", args.stride),
                       ("scales", args.scales)):
        if value is not None:
            cfg[key] = value
    if args.flip is not None:
        cfg["flip"] = args.flip
    if cfg.get("mode") == "slide" and not cfg.get("window"):
        raise SystemExit("--mode slide needs --window H W")
    if args.mode == "whole":
        cfg.pop("window", None), cfg.pop("stride", None)
    return cfg


def _evaluate(args, env) -> dict:
    import numpy as np

    from mdeq.data.cityscapes import (build_seg_eval_transform, build_segmentation_dataset, collate_same_size,
                                      save_label_png, to_label_ids)
    from mdeq.data.classification import build_eval_loader
    from mdeq.engine.base_trainer import AMP_DTYPES
    from mdeq.engine.distributed import broadcast_object
    from mdeq.engine.model_source import load_segmentation_model_for_eval
    from mdeq.engine.seg_inference import evaluate_segmentation
    from mdeq.engine.seg_trainer import build_inference

    loaded = load_segmentation_model_for_eval(args.source, args.model, use_ema=args.ema)
    model = loaded.model.to(env.device).eval()
    if loaded.schedule is not None:  # the solver settings of the run (DEQ mode, or unrolled if never left)
        loaded.schedule.apply_eval(model, loaded.step)
    changes = {k: v for k, v in dict(solver=args.solver, max_iter=args.f_thres, tol=args.tol,
                                     stop_mode=args.stop_mode).items() if v is not None}
    if changes:
        model.configure_deq(**changes)

    run_data = dict((loaded.config or {}).get("data") or {})
    name = args.dataset or run_data.get("name") or "cityscapes"
    root = args.data_root or run_data.get("root")
    if root is None and name != "synthetic":
        raise SystemExit("--data-root is required (a Cityscapes root, or an images/ + masks/ folder with --dataset "
                         "folder)")
    classes = args.classes or (loaded.classes if name == "folder" else None) or run_data.get("classes")
    data_cfg = loaded.data_cfg or {}
    transform = build_seg_eval_transform(**{k: tuple(data_cfg[k]) for k in ("mean", "std") if data_cfg.get(k)})
    labelled = not (args.no_labels or (name == "cityscapes" and args.split == "test"))
    label_type = args.label_type or run_data.get("label_type") or "auto"
    try:
        dataset = build_segmentation_dataset(name, root, args.split, transform=transform, classes=classes,
                                             require_labels=labelled,
                                             **({"label_type": label_type} if name != "folder" else {}))
    except Exception as e:
        hint = "" if not labelled or "label" not in str(e) else " (a split without labels: pass --no-labels)"
        raise SystemExit(f"{type(e).__name__}: {e}{hint}") from e
    n_out = model.num_classes
    if dataset.num_classes != n_out:
        raise SystemExit(f"the dataset has {dataset.num_classes} classes but the model predicts {n_out}")
    loader = build_eval_loader(dataset, args.batch_size, env.world_size, env.rank, args.workers,
                               collate_fn=collate_same_size)
    icfg = _inference_cfg(args, loaded.config)
    inference = build_inference(model, icfg, AMP_DTYPES[args.amp] if args.amp else None)

    out = Path(broadcast_object(args.output or str(Path("outputs") / "eval_seg" / time.strftime("%Y-%m-%d_%H-%M-%S")),
                                env))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    save_dir = Path(args.save_predictions) if args.save_predictions else None
    to_ids = name in ("cityscapes", "synthetic")

    def save(indices, images, masks, pred) -> None:
        for i, p in zip(indices, pred.cpu().numpy().astype(np.uint8)):
            save_label_png(save_dir / f"{dataset.relative_name(i)}.png", to_label_ids(p) if to_ids else p)

    res = evaluate_segmentation(model, loader, env, dataset.num_classes, ignore_index=dataset.ignore_index,
                                inference=inference, progress=not args.no_progress, desc="eval",
                                on_batch=save if save_dir is not None else None)
    m = res.metrics
    say = print if env.is_main else (lambda *a, **k: None)
    result = dict(source=args.source, description=loaded.description, arch=loaded.arch, dataset=name,
                  data_root=str(root) if root else None, split=args.split, images=res.count, labelled=labelled,
                  miou=_num(m.miou), aacc=_num(m.aacc), macc=_num(m.macc),
                  iou={c: _num(v) for c, v in zip(dataset.classes, m.iou)},
                  deq_nstep_mean=res.deq_nstep_mean, deq_rel_residual_mean=res.deq_rel_residual_mean,
                  deq_abs_residual_mean=res.deq_abs_residual_mean, inference=icfg,
                  solver={k: (v if isinstance(v, (int, float, str, bool, type(None), dict)) else str(v))
                          for k, v in model.deq.options.items()},
                  predictions=str(save_dir) if save_dir else None)
    if labelled:
        say(m.table(list(dataset.classes)))
        say(f"{loaded.description}: mIoU {m.miou:.2f}%  pixel acc. {m.aacc:.2f}%  mean acc. {m.macc:.2f}% on "
            f"{res.count} images; {res.deq_nstep_mean:.1f} solver steps/image, relative residual "
            f"{res.deq_rel_residual_mean:.3g}")
    else:
        say(f"{args.split}: no labels, no scores; {res.count} images predicted")
    if save_dir is not None:
        kind = "Cityscapes labelIds" if to_ids else "class indices"
        say(f"predictions ({kind}): {save_dir}")
    if env.is_main:
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        if labelled:
            (out / "iou.md").write_text(m.table(list(dataset.classes)) + "\n")
    say(f"results: {out / 'eval.json'}")
    return result


def _num(v: float):
    return v if v == v else None  # NaN (a class absent from labels and predictions) -> null in JSON


if __name__ == "__main__":
    main()
