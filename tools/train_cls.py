"""Train an MDEQ classifier on an ImageFolder dataset (Hydra app; configs/train_cls.yaml).

    python tools/train_cls.py                                   # mdeq_tiny on the bundled digits
    python tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    torchrun --nproc_per_node=4 tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    python tools/train_cls.py train.resume=outputs/train_cls/<run>/checkpoints/last.pth
"""
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mdeq.engine.app import register_resolvers, run_classification  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_cls")
def main(cfg: DictConfig) -> dict:
    return run_classification(cfg)


if __name__ == "__main__":
    main()
