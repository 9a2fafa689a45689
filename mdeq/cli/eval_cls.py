"""Evaluate a classifier (an MDEQ, or any timm model) on a val set: top-1/top-5, solver steps and residual.

    python tools/eval_cls.py outputs/train_cls/<run>/checkpoints/best.pth          # digits runs need no --data-root
    python tools/eval_cls.py model.safetensors --model mdeq_small --data-root /data/imagenet
    python tools/eval_cls.py MDEQ_Small_Cls.pkl --data-root /data/imagenet --solver broyden --max-iter 27
    python tools/eval_cls.py mdeq_small.<tag> --data-root /data/imagenet --sweep-iters 2 4 8 16 27
    python tools/eval_cls.py mdeq_small.<tag> --data hfds --data-root user/imagenet-1k --split validation
    python tools/eval_cls.py mdeq_small.<tag> --data wds --data-root /data/imagenet-wds --split val

The source is a training checkpoint of this package, a local weights file (safetensors, a state dict, or a
released official MDEQ checkpoint; the preset is inferred if --model is not given) or a timm name with a
pretrained tag. The val set is an ImageFolder split, a Hugging Face dataset's split (--data hfds) or a split of
WebDataset shards (--data wds). Eval transforms use the model's crop_pct (or the checkpoint's training data config).
``--sweep-iters`` evaluates at each forward-solver budget and writes sweep.csv, sweep.json and sweep.png.
The work is ``mdeq.engine.classification_eval.evaluate_classification_source``.
"""
import argparse
import sys

from mdeq.cli.common import (add_job_flags, add_solver_flags, exit_code_main, output_folder, run_distributed,
                             solver_changes)
from mdeq.engine.classification_eval import evaluate_classification_source


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="training checkpoint, weights file, or timm name with a tag (mdeq_small.<tag>)")
    p.add_argument("--data-root", help="ImageFolder root with a val/ split (default: the checkpoint's data); with "
                   "--data hfds: a save_to_disk folder, local dataset folder or Hub name; with --data wds: the "
                   "folder of .tar shards")
    p.add_argument("--data", choices=["imagefolder", "hfds", "wds"], dest="data_format",
                   help="the format of --data-root (default: imagefolder)")
    p.add_argument("--image-key", help="--data hfds: the image column (default image); wds: the image extensions "
                   "(default jpg;jpeg;png;webp)")
    p.add_argument("--label-key", help="--data hfds: the label column (default label); wds: the extension or .json "
                   "field holding the class index (default cls)")
    p.add_argument("--split", default="val")
    p.add_argument("--model", help="architecture for a bare weights file (default: inferred from the shapes)")
    p.add_argument("--num-classes", type=int, help="classes of a bare weights file (default: from the classifier)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (the solver stays in float32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--input-size", type=int, help="eval resolution (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the model's)")
    add_solver_flags(p)
    p.add_argument("--sweep-iters", type=int, nargs="+", metavar="N", help="evaluate at each of these solver budgets")
    add_job_flags(p, "eval_cls", "eval.json / sweep.*")
    return p


def run(argv=None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the command line's exit code)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    changes = solver_changes(parser, args)

    return run_distributed(args.device, lambda env: evaluate_classification_source(
        args.source, env, output_folder("eval_cls", args.output, env), data_root=args.data_root, split=args.split,
        data_format=args.data_format, image_key=args.image_key, label_key=args.label_key,
        model_name=args.model, num_classes=args.num_classes, use_ema=args.ema, solver_changes=changes,
        batch_size=args.batch_size, workers=args.workers, amp=args.amp, channels_last=args.channels_last,
        input_size=args.input_size, crop_pct=args.crop_pct, sweep_iters=args.sweep_iters,
        progress=not args.no_progress))


main = exit_code_main(run)


if __name__ == "__main__":
    sys.exit(main())
