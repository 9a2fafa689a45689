"""Evaluate an MDEQ segmentation model: dataset-level confusion matrix, mIoU and per-class IoU, solver steps.

    python tools/eval_seg.py outputs/train_seg/<run>/checkpoints/best.pth        # its own data and settings
    python tools/eval_seg.py mdeq_small.cityscapes_official --data-root /data/cityscapes
    python tools/eval_seg.py MDEQ_Small_Seg.pkl --data-root /data/cityscapes --mode slide --window 1024 1024
    python tools/eval_seg.py best.pth --data-root /data/cityscapes --scales 0.5 0.75 1 1.25 1.5 1.75 --flip
    python tools/eval_seg.py best.pth --data-root /data/cityscapes --split test --save-predictions preds/
    torchrun --nproc_per_node=4 tools/eval_seg.py best.pth --data-root /data/cityscapes
    python tools/eval_seg.py best.pth --dataset synthetic_video --stream --budget 1 2 4       # video, streamed
    python tools/eval_seg.py best.pth --dataset cityscapes_sequence --data-root /data/cityscapes --stream

The source is a ``train_seg`` checkpoint, a weights file (safetensors, a state dict, or a released official
MDEQ Cityscapes checkpoint, converted on the fly; the preset is inferred unless --model is given) or a
published tag. mIoU is the mean over classes of IoU = TP / (TP + FP + FN) from one confusion matrix over
the whole split; a class absent from both the labels and the predictions is left out of the mean (n/a).
``--save-predictions DIR`` writes one PNG per image under DIR/<city>/<image name>.png: Cityscapes labelIds
(what the official evaluation server takes) for Cityscapes data, class indices for other datasets.

Video (``--dataset synthetic_video | cityscapes_sequence | video_folder``): ``--stream`` runs each clip through
``mdeq.stream`` (every frame's solve starts from the previous frame's equilibrium) at each per-frame ``--budget`` of
f-evaluations, against the same model solving every frame from scratch at that budget and at the preset's official
tolerance; it reports mIoU on the annotated frames, f-evaluations and ms per frame, and mIoU against the frames
since a scene cut (``video.json``, ``video.md``). Without ``--stream`` a video set is solved frame by frame from
scratch (``synthetic_video`` without ``--stream`` is the still-image set that ``train_seg data=synthetic_video``
validates on). The work is ``mdeq.engine.segmentation_eval.evaluate_segmentation_source`` and
``evaluate_video_source``.
"""
import argparse
import sys

from mdeq.cli.common import (add_job_flags, add_solver_flags, exit_code_main, output_folder, run_distributed,
                             solver_changes)
from mdeq.data.factory import SEGMENTATION_DATASETS, VIDEO_DATASETS
from mdeq.engine.segmentation_eval import evaluate_segmentation_source, evaluate_video_source
from mdeq.engine.video_eval import DEFAULT_BUDGETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="train_seg checkpoint, weights file, or published tag (mdeq_small.<tag>)")
    p.add_argument("--dataset", choices=sorted(set(SEGMENTATION_DATASETS) | set(VIDEO_DATASETS)),
                   help="dataset layout (default: the checkpoint's, else cityscapes); video sets: "
                        f"{', '.join(VIDEO_DATASETS)}")
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
    add_solver_flags(p)
    v = p.add_argument_group("video (a video --dataset)")
    v.add_argument("--stream", action="store_true", help="carry each clip's equilibrium from frame to frame "
                   "(mdeq.stream) and compare with from-scratch solves")
    v.add_argument("--budget", type=int, nargs="+", metavar="K", help="f-evaluations per frame of the --stream "
                   f"comparison (default: {' '.join(map(str, DEFAULT_BUDGETS))})")
    v.add_argument("--streams", type=int, help="clips run side by side, one stream each (default: 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (the solver stays in float32)")
    p.add_argument("--save-predictions", metavar="DIR", help="write the predicted label PNGs here")
    add_job_flags(p, "eval_seg", "eval.json / iou.md")
    return p


def run(argv=None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the command line's exit code)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    changes = solver_changes(parser, args)
    inference = dict(mode=args.mode, window=args.window, stride=args.stride, scales=args.scales, flip=args.flip)
    video_only = set(VIDEO_DATASETS) - set(SEGMENTATION_DATASETS)  # synthetic_video is also a set of stills
    if args.stream or args.dataset in video_only:
        if args.stream and args.dataset not in VIDEO_DATASETS:
            parser.error(f"--stream needs a video --dataset ({', '.join(VIDEO_DATASETS)})")
        if args.budget and not args.stream:
            parser.error("--budget is the per-frame budget of --stream")
        if any(b < 1 for b in args.budget or ()) or (args.streams is not None and args.streams < 1):
            parser.error("--budget values and --streams must be >= 1")
        unused = [flag for flag, given in (("--mode slide", args.mode == "slide"), ("--window", args.window),
                                           ("--stride", args.stride), ("--scales", args.scales), ("--flip", args.flip),
                                           ("--save-predictions", args.save_predictions), ("--amp", args.amp),
                                           ("--no-labels", args.no_labels), ("--batch-size", args.batch_size != 1))
                  if given]
        if unused:
            parser.error(f"video evaluation runs one whole-frame pass per frame and stream, in float32, scored on the "
                         f"annotated frames (--streams N runs N clips side by side): {', '.join(unused)} do not apply")
        return run_distributed(args.device, lambda env: evaluate_video_source(
            args.source, env, output_folder("eval_seg", args.output, env), dataset=args.dataset,
            data_root=args.data_root, split=args.split, classes=args.classes, label_type=args.label_type,
            model_name=args.model, use_ema=args.ema, solver_changes=changes, streaming=args.stream,
            budgets=args.budget or DEFAULT_BUDGETS, streams=args.streams or 1, progress=not args.no_progress))
    if args.budget or args.streams:
        parser.error(f"--budget and --streams belong to video evaluation: a video --dataset "
                     f"({', '.join(VIDEO_DATASETS)}) with --stream")

    return run_distributed(args.device, lambda env: evaluate_segmentation_source(
        args.source, env, output_folder("eval_seg", args.output, env), dataset=args.dataset, data_root=args.data_root,
        split=args.split, classes=args.classes, label_type=args.label_type, no_labels=args.no_labels,
        model_name=args.model, use_ema=args.ema, solver_changes=changes, inference_changes=inference,
        batch_size=args.batch_size, workers=args.workers, amp=args.amp, save_predictions=args.save_predictions,
        progress=not args.no_progress))


main = exit_code_main(run)


if __name__ == "__main__":
    sys.exit(main())
