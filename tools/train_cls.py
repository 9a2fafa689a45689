"""Train an MDEQ classifier on an ImageFolder dataset (Hydra app; mdeq/configs/train_cls.yaml).

The program is ``mdeq.cli.train_cls`` (``python -m mdeq.cli.train_cls`` from an installed package); this file runs
it from a checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.train_cls import main  # noqa: E402

if __name__ == "__main__":
    main()
