"""Evaluate an MDEQ segmentation model: dataset-level confusion matrix, mIoU and per-class IoU, solver steps.

The program is ``mdeq.cli.eval_seg`` (``python -m mdeq.cli.eval_seg --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.eval_seg import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
