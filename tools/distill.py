"""Consistency distillation (C-DEQ) of a trained MDEQ classifier: a student that needs 1-4 f-evaluations.

The program is ``mdeq.cli.distill`` (``python -m mdeq.cli.distill --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
