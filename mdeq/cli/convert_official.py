"""Convert a released MDEQ checkpoint (locuslab/mdeq or locuslab/deq, .pkl/.pth) to safetensors for mdeq-zoo.

    python tools/convert_official.py MDEQ_Small_Cls.pkl mdeq_small.safetensors [--model mdeq_small]

The preset is inferred from the checkpoint's names and shapes unless --model is given. The converted weights
are loaded strictly into the model before anything is written: a checkpoint that does not fit fails with the
list of missing, unexpected and mis-shaped keys (the original loaders ignore them and keep random weights).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from mdeq.cli.common import reported_errors
from mdeq.engine.weights import read_state_dict
from mdeq.models import StateDictMismatch, build_preset, infer_preset, load_converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official checkpoint (torch.save'd state dict)")
    parser.add_argument("output", type=Path, help="where to write the .safetensors file")
    parser.add_argument("--model", help="preset name (mdeq_tiny, mdeq_small, mdeq_xl, ...); inferred if absent")
    parser.add_argument("--task", choices=("cls", "seg"), help="classification or segmentation (with --model)")
    args = parser.parse_args(argv)

    if args.output.suffix != ".safetensors":
        parser.error(f"output must end in .safetensors, got {args.output.name}")
    with reported_errors():  # not a checkpoint: the file, what it is and the formats accepted
        sd = read_state_dict(args.checkpoint)  # converted to this package's names
    try:
        if args.model:
            task = args.task or ("seg" if "last_layer.3.weight" in sd else "cls")
            key = "last_layer.3.weight" if task == "seg" else "classifier.weight"
            if key not in sd:
                raise StateDictMismatch(f"the checkpoint has no {key!r}: it is not a {task} checkpoint")
            name, num_classes = args.model, sd[key].shape[0]
        else:
            name, task, num_classes = infer_preset(sd)
        model = build_preset(name, task, num_classes).to_empty(device="cpu")
        load_converted(model, sd)
    except (StateDictMismatch, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.output.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"architecture": name, "task": task, "num_classes": str(num_classes),
                                          "source": args.checkpoint.name})
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{args.checkpoint} -> {args.output}: {name} ({task}, {num_classes} classes, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
