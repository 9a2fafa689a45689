"""Fine-tune an MDEQ backbone on an ImageFolder dataset with a new classifier (Hydra app;
mdeq/configs/finetune.yaml).

    python tools/finetune.py model.weights=outputs/train_cls/<run>/checkpoints/best.pth data.root=/data/mine
    python tools/finetune.py model=mdeq_small model.weights=MDEQ_Small_Cls.pkl data.root=/data/mine \
        model.freeze=[stem] optim.layer_decay=0.75
    python tools/finetune.py --help    # the commands run most, the groups and the options it takes
"""
import functools

from mdeq.cli.common import hydra_tool
from mdeq.engine.app import run_classification
from mdeq.engine.tool_help import with_help

main = with_help("finetune", hydra_tool("finetune", functools.partial(run_classification, require_start_weights=True)))

if __name__ == "__main__":
    main()
