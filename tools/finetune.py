"""Fine-tune an MDEQ backbone on an ImageFolder dataset with a new classifier (Hydra app; configs/finetune.yaml).

    python tools/finetune.py model.weights=outputs/train_cls/<run>/checkpoints/best.pth data.root=/data/mine
    python tools/finetune.py model=mdeq_small model.weights=MDEQ_Small_Cls.pkl data.root=/data/mine \
        model.freeze=[stem] optim.layer_decay=0.75
"""
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mdeq.engine.app import register_resolvers, run_classification  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="finetune")
def main(cfg: DictConfig) -> dict:
    return run_classification(cfg, require_start_weights=True)


if __name__ == "__main__":
    main()
