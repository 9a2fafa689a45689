"""Evaluate an MDEQ classifier on an ImageFolder val set: top-1/top-5, solver steps and residual.

The program is ``mdeq.cli.eval_cls`` (``python -m mdeq.cli.eval_cls --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.eval_cls import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
