"""Export an MDEQ at a fixed budget of f-evaluations: ONNX (default), torch.export (.pt2) or TorchScript (.pt).

    python tools/export.py mdeq_tiny.digits --budget 4 --check                 # mdeq_tiny_digits_k4.onnx
    python tools/export.py outputs/train_cls/<run>/checkpoints/best.pth --budget 8 --output model.pt2
    python tools/export.py model.safetensors --model mdeq_small --solver fixed_point --init skip_reg --budget 6
    python tools/export.py seg.pth --segmentation --input-size 512 1024 --budget 6 --format torchscript
    python tools/export.py seg.pth --segmentation --input-size 128 256 --budget 2 --stream --check   # video

An implicit model does not deploy, a fixed budget does: the file computes what the model computes in eval mode
with K f-evaluations (``mdeq.core.budget_options``), as a static graph with a dynamic batch dimension and the
given height and width. The source is what ``eval_cls`` / ``eval_seg`` take (a training checkpoint, a weights
file, a timm name with a tag); ``--solver`` / ``--init`` change its settings first. ``--budget`` defaults to
the model's own evaluation budget (``max_iter``, plus one for the Skip Reg. start): the same work as its
inference at most, at which its metrics were measured. ``--check`` runs the written file once (ONNX Runtime for
.onnx) on random images and prints the largest difference to the model at that budget. ``--stream`` writes the
streaming form for video (``fixed_budget(model, k, stream=True)``: inputs ``images``, ``state``, ``fresh``; outputs
``output``, ``next_state``, ``next_fresh``); its ``--check`` runs 3 frames through the file, the state carried, against
``mdeq.stream`` at that budget.
The work is ``mdeq.export`` (``fixed_budget``, ``save_exported``).
"""
import argparse
import copy
import re
import sys
from pathlib import Path

import torch
from timm.data import resolve_data_config

import mdeq
from mdeq.cli.common import exit_code_main
from mdeq.core import INITS, budget_options
from mdeq.engine.model_source import load_model_for_eval, load_segmentation_model_for_eval
from mdeq.export import (EXPORTABLE_SOLVERS, FORMATS, budget_reference, export_format, fixed_budget, run_exported,
                         save_exported)
from mdeq.models.control import find_mdeqs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="training checkpoint, weights file, or timm name with a tag (mdeq_tiny.digits)")
    p.add_argument("--output", help="file to write; its suffix picks the format (default: <source>_k<K>.onnx)")
    p.add_argument("--format", choices=sorted(FORMATS), help="onnx (.onnx), export (torch.export, .pt2) or "
                   "torchscript (.pt); default: from --output's suffix, else onnx")
    p.add_argument("--budget", type=int, metavar="K", help="f-evaluations (default: the model's own evaluation "
                   "budget, max_iter + 1 with init skip_reg)")
    p.add_argument("--solver", choices=EXPORTABLE_SOLVERS, help="forward solver (default: the model's)")
    p.add_argument("--init", choices=INITS, help="initial guess (default: the model's)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="H [W] of the exported input (default: "
                   "the model's pretrained cfg or the checkpoint's data config)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input (the batch stays dynamic)")
    p.add_argument("--segmentation", action="store_true", help="the source is a segmentation model")
    p.add_argument("--model", help="architecture of a bare weights file (default: inferred from the shapes)")
    p.add_argument("--num-classes", type=int, help="classes of a bare weights file (default: from its head)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--stream", action="store_true", help="the streaming form for video: the previous frame's "
                   "equilibrium in, the new one out (mdeq.stream at the budget)")
    p.add_argument("--check", action="store_true", help="run the written file once and compare with the model")
    return p


def run(argv=None) -> dict:
    """Parse ``argv`` and run; returns what was written (``main`` is the command line's exit code)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget < 1:
        parser.error(f"--budget must be at least 1 f-evaluation, got {args.budget}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    load = load_segmentation_model_for_eval if args.segmentation else load_model_for_eval
    loaded = load(args.source, args.model, args.num_classes, args.ema)
    model = loaded.model.cpu().eval()
    if not find_mdeqs(model):
        parser.error(f"{loaded.description} ({loaded.arch}) holds no MDEQ: the fixed-budget export unrolls an MDEQ's "
                     "solver; export an explicit network with torch.onnx.export or torch.export directly")
    changes = {k: v for k, v in dict(solver=args.solver, init=args.init).items() if v is not None}
    try:
        if changes:
            model.configure_deq(**changes)
        o = model.deq.options
        budget = args.budget or o["max_iter"] + (1 if o["init"] == "skip_reg" else 0)
        fmt = export_format(args.output, args.format) if args.output else (args.format or "onnx")
        net = fixed_budget(model, budget, stream=args.stream)
    except ValueError as err:
        parser.error(str(err))
    h, w = _input_size(parser, args, loaded, model)
    output = Path(args.output or f"{_stem(args.source)}_k{budget}{'_stream' if args.stream else ''}{FORMATS[fmt]}")
    images = torch.randn(args.batch_size, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    example = (images, *net.start(images)) if args.stream else images
    save_exported(net, output, example, fmt)
    what = (f"inputs images (B, {model.in_chans}, {h}, {w}), state (B, {example[1].shape[1]}), fresh (B,) bool"
            if args.stream else f"input (B, {model.in_chans}, {h}, {w})")
    print(f"wrote {output} ({fmt}): {loaded.description} at {net.plan.describe()}"
          f"{', streaming' if args.stream else ''}; {what} with a dynamic batch B")
    result = dict(path=str(output), format=fmt, budget=budget, input_size=[model.in_chans, h, w],
                  solver=net.plan.solver, init=net.plan.init, stream=args.stream)
    if args.check and args.stream:
        diff, scale = _check_stream(model, budget, net, output, images, fmt)
        print(f"check: {output.name} vs mdeq.stream at {budget} f-evaluation{'s' if budget != 1 else ''} a frame, "
              f"3 frames of {args.batch_size} random streams: max |difference| {diff:.3g} (max |output| {scale:.3g})")
        result.update(max_abs_diff=diff, max_abs_output=scale)
    elif args.check:
        ref = budget_reference(model, budget, images)
        out = run_exported(output, images, fmt)
        diff = (out.float() - ref.float()).abs().max().item()
        scale = ref.abs().max().item()
        print(f"check: {output.name} vs the model at {net.plan.describe().split(':')[0]} on {args.batch_size} random "
              f"images: max |difference| {diff:.3g} (max |output| {scale:.3g})")
        result.update(max_abs_diff=diff, max_abs_output=scale)
    return result


def _check_stream(model, budget: int, net, path: Path, images: torch.Tensor, fmt: str) -> tuple:
    """Largest |file - mdeq.stream| over 3 slowly changing frames, the file's state fed back; and the output scale."""
    eager = mdeq.stream(copy.deepcopy(model).eval(), **budget_options(model.deq.options, budget))
    g = torch.Generator().manual_seed(1)
    state, fresh = net.start(images)
    diff = scale = 0.0
    frame = images
    for _ in range(3):
        out, state, fresh = run_exported(path, (frame, state, fresh), fmt)
        ref = eager(frame)
        diff = max(diff, (out.float() - ref.float()).abs().max().item())
        scale = max(scale, ref.abs().max().item())
        frame = frame + 0.05 * torch.randn(frame.shape, generator=g)
    return diff, scale


def _input_size(parser: argparse.ArgumentParser, args: argparse.Namespace, loaded, model) -> tuple:
    """(H, W): the flag, else the checkpoint's data config or the model's pretrained cfg (classifiers)."""
    size = args.input_size
    if size is None and not args.segmentation:
        size = list(resolve_data_config({**(loaded.data_cfg or {})}, model=model)["input_size"][1:])
    if size is None:
        parser.error("--input-size H [W] is required for a segmentation model (it has no stored input size)")
    if len(size) not in (1, 2):
        parser.error(f"--input-size takes H or H W, got {size}")
    h, w = (size[0], size[0]) if len(size) == 1 else size
    divisor = model.cfg.size_divisor
    if h % divisor or w % divisor:
        parser.error(f"--input-size {h} {w}: H and W must be multiples of {divisor} for this model")
    return h, w


def _stem(source: str) -> str:
    """A file-name stem for ``source``: a file's stem, or a timm name with its dots and slashes replaced."""
    path = Path(source)
    return path.stem if path.is_file() else re.sub(r"[^A-Za-z0-9_-]+", "_", source)


main = exit_code_main(run)


if __name__ == "__main__":
    sys.exit(main())
