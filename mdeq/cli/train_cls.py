"""Train an MDEQ classifier on an ImageFolder dataset (Hydra app; mdeq/configs/train_cls.yaml).

    python tools/train_cls.py                                   # mdeq_tiny on the bundled digits
    python tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    torchrun --nproc_per_node=4 tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet
    python tools/train_cls.py train.resume=outputs/train_cls/<run>/checkpoints/last.pth
    python -m mdeq.cli.train_cls ...                            # the same from an installed package
    python tools/train_cls.py --help    # the commands run most, the groups and the options it takes
"""
from mdeq.cli.common import hydra_tool
from mdeq.engine.app import run_classification
from mdeq.engine.tool_help import with_help

main = with_help("train_cls", hydra_tool("train_cls", run_classification))

if __name__ == "__main__":
    main()
