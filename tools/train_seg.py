"""Train an MDEQ semantic segmentation model (Hydra app; configs/train_seg.yaml).

    python tools/train_seg.py                                     # mdeq_small on generated street scenes
    python tools/train_seg.py experiment=cityscapes_small data.root=/data/cityscapes
    torchrun --nproc_per_node=4 tools/train_seg.py experiment=cityscapes_small data.root=/data/cityscapes
    python tools/train_seg.py ~experiment data=seg_folder data.root=/data/mine model.weights=best.pth
    python tools/train_seg.py train.resume=outputs/train_seg/<run>/checkpoints/last.pth
"""
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mdeq.engine.app import register_resolvers, run_segmentation  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_seg")
def main(cfg: DictConfig) -> dict:
    return run_segmentation(cfg)


if __name__ == "__main__":
    main()
