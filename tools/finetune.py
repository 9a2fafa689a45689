"""Fine-tune an MDEQ backbone on an ImageFolder dataset with a new classifier (Hydra app).

The program is ``mdeq.cli.finetune`` (``python -m mdeq.cli.finetune`` from an installed package); this file runs
it from a checkout.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdeq.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
