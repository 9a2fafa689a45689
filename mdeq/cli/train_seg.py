"""Train an MDEQ semantic segmentation model (Hydra app; mdeq/configs/train_seg.yaml).

    python tools/train_seg.py                                     # mdeq_small on generated street scenes
    python tools/train_seg.py experiment=cityscapes_small data.root=/data/cityscapes
    torchrun --nproc_per_node=4 tools/train_seg.py experiment=cityscapes_small data.root=/data/cityscapes
    python tools/train_seg.py ~experiment data=seg_folder data.root=/data/mine model.weights=best.pth
    python tools/train_seg.py train.resume=outputs/train_seg/<run>/checkpoints/last.pth
    python tools/train_seg.py --help    # the commands run most, the groups and the options it takes
"""
from mdeq.cli.common import hydra_tool
from mdeq.engine.app import run_segmentation
from mdeq.engine.tool_help import with_help

main = with_help("train_seg", hydra_tool("train_seg", run_segmentation))

if __name__ == "__main__":
    main()
