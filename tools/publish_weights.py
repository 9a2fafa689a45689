"""Publish trained weights: a Hub-style folder, a catalog entry and the regenerated MODEL_CARDS.md.

The program is ``mdeq.cli.publish_weights`` (``python -m mdeq.cli.publish_weights --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.publish_weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
