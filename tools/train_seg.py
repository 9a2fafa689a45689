"""Train an MDEQ semantic segmentation model (Hydra app; mdeq/configs/train_seg.yaml).

The program is ``mdeq.cli.train_seg`` (``python -m mdeq.cli.train_seg`` from an installed package); this file runs
it from a checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.train_seg import main  # noqa: E402

if __name__ == "__main__":
    main()
