"""Evaluate an MDEQ classifier on an ImageFolder val set: top-1/top-5, solver steps and residual.

    python tools/eval_cls.py outputs/train_cls/<run>/checkpoints/best.pth          # digits runs need no --data-root
    python tools/eval_cls.py model.safetensors --model mdeq_small --data-root /data/imagenet
    python tools/eval_cls.py MDEQ_Small_Cls.pkl --data-root /data/imagenet --solver broyden --f-thres 26
    python tools/eval_cls.py mdeq_small.<tag> --data-root /data/imagenet --sweep-iters 2 4 8 16 26

The source is a training checkpoint of this package, a local weights file (safetensors, a state dict, or a
released official MDEQ checkpoint; the preset is inferred if --model is not given) or a timm name with a
pretrained tag. Eval transforms use the model's crop_pct (or the checkpoint's training data config).
``--sweep-iters`` evaluates at each forward-solver budget and writes sweep.csv, sweep.json and sweep.png.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="training checkpoint, weights file, or timm name with a tag (mdeq_small.<tag>)")
    p.add_argument("--data-root", help="ImageFolder root with a val/ split (default for digits checkpoints: the cache)")
    p.add_argument("--split", default="val")
    p.add_argument("--model", help="architecture for a bare weights file (default: inferred from the shapes)")
    p.add_argument("--num-classes", type=int, help="classes of a bare weights file (default: from the classifier)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (the solver stays in float32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--input-size", type=int, help="eval resolution (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the model's)")
    p.add_argument("--solver", help="forward solver: anderson | broyden | fixed_point | unroll")
    p.add_argument("--f-thres", type=int, help="forward iteration cap")
    p.add_argument("--tol", type=float)
    p.add_argument("--stop-mode", choices=["abs", "rel"])
    p.add_argument("--sweep-iters", type=int, nargs="+", metavar="N", help="evaluate at each of these solver budgets")
    p.add_argument("--output", help="folder for eval.json / sweep.* (default: outputs/eval_cls/<time>)")
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


def _evaluate(args, env) -> dict:
    import torch

    from mdeq.data.classification import (ImageFolderDataset, build_eval_loader, build_transform, find_split,
                                          resolve_data_cfg)
    from mdeq.data.digits import prepare_digits
    from mdeq.engine.evaluate import evaluate_classifier, sweep_solver_budgets
    from mdeq.engine.model_source import load_model_for_eval
    from mdeq.engine.trainer import AMP_DTYPES

    loaded = load_model_for_eval(args.source, args.model, args.num_classes, args.ema)
    model = loaded.model.to(env.device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if loaded.schedule is not None:  # the solver settings of the run (DEQ mode, or unrolled if never left)
        loaded.schedule.apply_eval(model, loaded.step)
    solver_changes = {k: v for k, v in dict(solver=args.solver, max_iter=args.f_thres, tol=args.tol,
                                            stop_mode=args.stop_mode).items() if v is not None}
    if solver_changes:
        model.configure_deq(**solver_changes)

    root = args.data_root
    if root is None:
        if loaded.config is not None and loaded.config["data"].get("name") == "digits":
            root = prepare_digits(loaded.config["data"].get("root"))
        elif loaded.config is not None and loaded.config["data"].get("root"):
            root = loaded.config["data"]["root"]
        else:
            raise SystemExit("--data-root is required: an ImageFolder root with a val/<class>/ split")
    # the run's training data config (else the model's pretrained cfg), then the command line's overrides
    data_cfg = resolve_data_cfg(model, {**(loaded.data_cfg or {}), "input_size": args.input_size,
                                        "crop_pct": args.crop_pct})
    class_to_idx = {c: i for i, c in enumerate(loaded.classes)} if loaded.classes else None
    dataset = ImageFolderDataset(find_split(root, args.split), transform=build_transform(data_cfg, False),
                                 class_to_idx=class_to_idx)
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and len(dataset.classes) > n_out:
        raise SystemExit(f"the val set has {len(dataset.classes)} classes but the model predicts {n_out}")
    loader = build_eval_loader(dataset, args.batch_size, env.world_size, env.rank, args.workers)
    amp = AMP_DTYPES[args.amp] if args.amp else None
    kw = dict(amp_dtype=amp, channels_last=args.channels_last, progress=not args.no_progress)

    from mdeq.engine.distributed import broadcast_object

    out = Path(broadcast_object(args.output or str(Path("outputs") / "eval_cls" / time.strftime("%Y-%m-%d_%H-%M-%S")),
                                env))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    say = print if env.is_main else (lambda *a, **k: None)
    res = evaluate_classifier(model, loader, env, **kw)
    result = dict(source=args.source, description=loaded.description, arch=loaded.arch, split=args.split,
                  data_root=str(root), images=res.count, top1=res.top1, top5=res.top5, loss=res.loss,
                  deq_nstep_mean=res.deq_nstep_mean, deq_rel_residual_mean=res.deq_rel_residual_mean,
                  deq_abs_residual_mean=res.deq_abs_residual_mean, solver=_jsonable(model.deq.options),
                  input_size=list(data_cfg["input_size"]), crop_pct=data_cfg.get("crop_pct"))
    say(f"{loaded.description}: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  on {res.count} images; "
          f"{res.deq_nstep_mean:.1f} solver steps/image, relative residual {res.deq_rel_residual_mean:.3g}")
    if args.sweep_iters:
        base = dict(model.deq.options)
        rows = sweep_solver_budgets(model, loader, env, args.sweep_iters,
                                    lambda k: model.configure_deq(max_iter=k), **kw)
        model.configure_deq(max_iter=base["max_iter"])
        result["sweep"] = rows
        if env.is_main:
            _write_sweep(rows, out, f"{loaded.arch} ({base['solver']})")
        say("max_iter  top-1   top-5   steps  rel.residual")
        for r in rows:
            say(f"{r['max_iter']:8d}  {r['top1']:6.2f}  {r['top5']:6.2f}  {r['deq_nstep_mean']:5.1f}  "
                  f"{r['deq_rel_residual_mean']:.3g}")
    if env.is_main:
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"results: {out / 'eval.json'}" + (f", {out / 'sweep.png'}" if args.sweep_iters else ""))
    return result


def _jsonable(d):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), dict)) else str(v)) for k, v in d.items()}


def _write_sweep(rows, out: Path, title: str) -> None:
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    iters = [r["max_iter"] for r in rows]
    ax.plot(iters, [r["top1"] for r in rows], "o-", label="top-1")
    ax.plot(iters, [r["top5"] for r in rows], "s--", label="top-5")
    ax.set_xlabel("forward solver budget (max_iter)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs. solver iterations: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
