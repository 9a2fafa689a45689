"""Convert a released MDEQ checkpoint (locuslab/mdeq or locuslab/deq, .pkl/.pth) to safetensors for mdeq-zoo.

The program is ``mdeq.cli.convert_official`` (``python -m mdeq.cli.convert_official --help``); this file runs it from a
checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.convert_official import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
