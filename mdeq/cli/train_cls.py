"""Train an MDEQ classifier on an ImageFolder dataset (Hydra app; mdeq/configs/train_cls.yaml).

    python tools/train_cls.py                                   # mdeq_tiny on the bundled digits
    python tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    torchrun --nproc_per_node=4 tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    python tools/train_cls.py train.resume=outputs/train_cls/<run>/checkpoints/last.pth
    python -m mdeq.cli.train_cls ...                            # the same from an installed package
"""
from mdeq.cli.common import hydra_tool
from mdeq.engine.app import run_classification

main = hydra_tool("train_cls", run_classification)

if __name__ == "__main__":
    main()
