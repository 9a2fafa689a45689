"""Export an MDEQ at a fixed budget of f-evaluations: ONNX (default), torch.export (.pt2) or TorchScript (.pt).

The program is ``mdeq.cli.export`` (``python -m mdeq.cli.export --help``); this file runs it from a checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
