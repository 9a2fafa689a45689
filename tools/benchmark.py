#!/usr/bin/env python
"""Benchmarks of mdeq-zoo. Usage: python tools/benchmark.py solvers [--quick] [--out DIR]

solvers   f-evaluations, wall time and solver-overhead ratio of every solver on a fixed suite
          (see mdeq/benchmarks/solvers.py for the problems and the timing method)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdeq.benchmarks import solvers as solver_bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("solvers", help="solver f-evaluations, wall time and overhead ratio")
    p.add_argument("--quick", action="store_true", help="tiny problems (a smoke test, not a measurement)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round (default 5)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative residual to reach (default 1e-4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="where to write JSON + Markdown")
    args = parser.parse_args(argv)

    if args.command == "solvers":
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        result = solver_bench.run(quick=args.quick, repeats=args.repeats, tol=args.tol, threads=args.threads)
        paths = solver_bench.save(result, args.out)
        print()
        print(solver_bench.to_markdown(result))
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
