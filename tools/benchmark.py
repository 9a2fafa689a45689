"""Benchmarks of mdeq-zoo (solvers, models, train, seg, budget).

The program is ``mdeq.cli.benchmark`` (``python -m mdeq.cli.benchmark --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
