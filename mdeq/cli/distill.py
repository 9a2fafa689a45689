"""Consistency distillation (C-DEQ) of a trained MDEQ classifier: a student that needs 1-4 f-evaluations.

    python tools/distill.py outputs/train_cls/<run>/checkpoints/last.pth            # digits runs need no --data-root
    python tools/distill.py best.pth --data-root /data/imagenet --teacher-steps 20 --epochs 5
    python tools/eval_cls.py outputs/distill/<time>/distilled.pth --sweep-iters 1 2 4

The teacher (the checkpoint's model, frozen) runs its solver for --teacher-steps iterations on the train images;
only the student's small per-resolution generator is trained. The output ``distilled.pth`` evaluates with
``solver='consistency'`` (its ``max_iter`` = student steps) in eval_cls and publishes with publish_weights.
"""
import argparse
import shlex
from pathlib import Path
import logging
import sys

from mdeq.cli.common import add_job_flags, exit_code_main, output_folder, run_distributed
from mdeq.core.solvers import root_solvers
from mdeq.engine.distill import distill_classifier


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a train_cls checkpoint (the frozen teacher)")
    p.add_argument("--data-root", help="the ImageFolder root it was trained on (default: the run's)")
    p.add_argument("--teacher-solver", default="anderson", choices=root_solvers(),
                   help="solver whose trajectory the student learns (default anderson, as the paper)")
    p.add_argument("--teacher-steps", type=int, default=16, help="trajectory length K (default 16)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3, help="AdamW learning rate (the paper code's 4e-3)")
    p.add_argument("--ema-decay", type=float, default=0.98)
    p.add_argument("--student-kernel", type=int, default=1, choices=[1, 3],
                   help="kernel of the student's per-resolution convs: 1 (the C-DEQ recipe) or 3 (spatial context)")
    p.add_argument("--global-weight", type=float, default=0.9)
    p.add_argument("--local-weight", type=float, default=0.1)
    p.add_argument("--eval-iters", type=int, nargs="+", default=[1, 2, 4],
                   help="student steps to evaluate; the smallest becomes the checkpoint's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="LAST_PTH",
                   help="continue a distillation stopped by SIGTERM / SIGUSR1 / Ctrl-C from the last.pth it wrote "
                        "(same arguments; with --output its folder)")
    add_job_flags(p, "distill", "distilled.pth / metrics.json")
    return p.parse_args(argv)


def _resume_hint(argv, out) -> str:
    """The command that continues this run: its arguments, writing to the same folder, plus ``--resume``."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--output"):
            skip = True
            continue
        if not a.startswith(("--resume=", "--output=")):
            keep.append(a)
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "tools/distill.py"
    return " ".join(shlex.quote(a) for a in ["python", prog, *keep, "--output", str(out), "--resume"])


def run(argv=None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the command line's exit code)."""
    args = parse_args(argv)
    for name in ("teacher_steps", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.eval_iters) < 1:
        raise SystemExit("--eval-iters must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def job(env):
        given = args.output or (str(Path(args.resume).parent) if args.resume else None)  # resume: the same folder
        out = output_folder("distill", given, env)
        m = distill_classifier(args.checkpoint, out, env, data_root=args.data_root, teacher_solver=args.teacher_solver,
                               teacher_steps=args.teacher_steps, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, ema_decay=args.ema_decay, global_weight=args.global_weight,
                               local_weight=args.local_weight, eval_iters=args.eval_iters, seed=args.seed,
                               workers=args.workers, progress=not args.no_progress,
                               student_kernel_size=args.student_kernel, resume=args.resume,
                               resume_hint=_resume_hint(argv, out))
        return m, out, env.is_main

    m, out, is_main = run_distributed(args.device, job)
    if is_main:
        print("f-evals  student top-1  teacher top-1")
        for k in args.eval_iters:
            print(f"{k:7d}  {m['val_top1_student'][str(k)]:13.2f}  {m['val_top1_teacher'][str(k)]:13.2f}")
        print(f"teacher at its own budget: {m['val_top1_teacher']['converged']:.2f}%")
        print(f"distilled checkpoint: {out / 'distilled.pth'} ({m['distill_seconds']:.0f} s); metrics: "
              f"{out / 'metrics.json'}")
    return m


main = exit_code_main(run)


if __name__ == "__main__":
    sys.exit(main())
