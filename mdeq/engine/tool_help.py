"""``--help`` of the Hydra training tools (train_cls, train_seg, finetune), generated from the configs.

The page says what the tool does (the leading comment of ``mdeq/configs/<tool>.yaml``), the commands run most
(``EXAMPLES``; a test runs each one through the tool's entry point), and the config groups of the tool's defaults
list with the options this tool takes, each with the first comment line of its YAML file. Which options it
takes comes from the tools' own rule, ``app.task_refusal`` (a model or data option of the other task is refused),
and from Hydra (an experiment that does not compose with the tool's config, or that picks a refused option, is
left out). Hydra's own page stays behind ``--hydra-help``; the whole config is ``--cfg job``.
"""
from __future__ import annotations

import functools
import re
import shlex
import shutil
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode

from .app import CODE_CONFIGS, CONFIG_MODULE, TASK_GROUPS, config_task, register_configs, task_refusal

__all__ = ["Example", "EXAMPLES", "HELP_FLAGS", "ToolConfig", "tool_config", "option_description", "program",
           "help_text", "with_help"]

HELP_FLAGS = ("--help", "-h")  # Hydra's --help / -h; --hydra-help is left to Hydra


@dataclass(frozen=True)
class Example:
    """One command of a tool's help: its overrides, what it does, and whether it runs under torchrun."""

    overrides: Tuple[str, ...]
    note: str = ""
    torchrun: bool = False


# a run folder as the tools name it (outputs/<tool>/<time>); Hydra's override grammar refuses "<run>"
_RUN = "2025-01-31_09-30-00"
_RESUME = "train.resume=outputs/{tool}/" + _RUN + "/checkpoints/last.pth"
_BEST = f"model.weights=outputs/train_cls/{_RUN}/checkpoints/best.pth"
_AGAIN = "resume a run where it stopped (in its folder): its own command plus train.resume=<its last.pth>"
_DDP = "the same on the 4 GPUs of one machine (DDP; data.batch_size is per process)"

# the commands a user runs most, per tool; an empty note on the first: the default experiment's own description
EXAMPLES: Dict[str, Tuple[Example, ...]] = {
    "train_cls": (
        Example(()),
        Example(("experiment=imagenet_small", "data.root=/data/imagenet"),
                "an official recipe (group experiment below) on your copy of its data"),
        Example(("~experiment", "data=imagefolder", "data.root=/data/mine", "model=mdeq_tiny"),
                "your own ImageFolder (train/<class>/*, val/<class>/*) without a recipe: the own-data defaults "
                "(input size and crops chosen from the images; deq/default and schedule/default carry the MDEQ "
                "essentials)"),
        Example(("~experiment", "data=imagefolder", "data.root=/data/mine", "model.name=resnet18"),
                "an explicit baseline on the same data with the same recipe: any timm classifier (the MDEQ "
                "settings are skipped for a model without an MDEQ)"),
        Example(("experiment=imagenet_small", "data.root=/data/imagenet", _RESUME.format(tool="train_cls")), _AGAIN),
        Example(("experiment=imagenet_small", "data.root=/data/imagenet"), _DDP, torchrun=True),
    ),
    "train_seg": (
        Example(()),
        Example(("experiment=cityscapes_small", "data.root=/data/cityscapes"),
                "an official recipe (group experiment below) on your copy of Cityscapes"),
        Example(("~experiment", "data=seg_folder", "data.root=/data/mine", "model=seg_mdeq_small",
                 "model.backbone=mdeq_small.in1k_official"),
                "your own data (images/<split>/, masks/<split>/, classes.txt) from the ImageNet backbone"),
        Example(("experiment=cityscapes_small", "data.root=/data/cityscapes", _RESUME.format(tool="train_seg")),
                _AGAIN),
        Example(("experiment=cityscapes_small", "data.root=/data/cityscapes"), _DDP, torchrun=True),
    ),
    "finetune": (
        Example((_BEST, "data.root=/data/mine"),
                "fine-tune a train_cls checkpoint on your ImageFolder (a new head if the class count differs)"),
        Example(("model=mdeq_small", "model.name=mdeq_small.in1k_official", "model.pretrained=true",
                 "data.root=/data/mine"), "start from published weights (MODEL_CARDS.md lists them)"),
        Example(("model=mdeq_small", "model.weights=MDEQ_Small_Cls.pkl", "data.root=/data/mine",
                 "model.freeze=[stem]", "optim.layer_decay=0.75"),
                "from a released official checkpoint, stem frozen, layer-wise lr decay"),
        Example((_BEST, "data.root=/data/mine", _RESUME.format(tool="finetune")), _AGAIN),
        Example((_BEST, "data.root=/data/mine"), _DDP, torchrun=True),
    ),
}


@dataclass(frozen=True)
class ToolConfig:
    """What a tool's config offers: its task, the groups of its defaults list in order, each group's choice in
    the default job (and without the experiment, where the tool has one), and the options it takes."""

    tool: str
    task: str
    groups: Tuple[str, ...]
    default: Dict[str, Optional[str]]
    without_experiment: Dict[str, Optional[str]]
    options: Dict[str, Tuple[str, ...]]


@contextmanager
def _configs() -> Iterator[None]:
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        yield


_QUIET = ("hydra/job_logging=none", "hydra/hydra_logging=none")  # the same app config, composed faster


def _choices(tool: str, overrides: Sequence[str]) -> Dict[str, Optional[str]]:
    """The app groups of ``tool``'s config with ``overrides`` and their options, in the order of the defaults
    list (Hydra's ``hydra.runtime.choices``, without composing the values)."""
    loader = GlobalHydra.instance().config_loader()
    chosen = loader.compute_defaults_list(tool, [*overrides, *_QUIET], RunMode.RUN).overrides.known_choices
    return {g: chosen[g] for g in reversed(list(chosen)) if not g.startswith("hydra/")}


def _experiment_choices(tool: str, experiment: str) -> Optional[Dict[str, Optional[str]]]:
    """The groups' options with ``experiment=<experiment>``; None if it does not compose with the tool's config
    (a segmentation recipe overrides a group train_cls does not have)."""
    try:
        return _choices(tool, [f"experiment={experiment}"])
    except HydraException:
        return None


@functools.lru_cache(maxsize=None)
def tool_config(tool: str) -> ToolConfig:
    """The groups and options of ``tool`` (``train_cls``, ``train_seg``, ``finetune``), from its config files.

    An option of a task group (``app.TASK_GROUPS``) is listed if the tool's rule (``app.task_refusal``) takes
    it, an experiment if it composes with the tool's config and picks only such options; the other groups'
    options are for any task and all listed (a test checks each one against the tool's job)."""
    with _configs():
        task = config_task(compose(tool, overrides=list(_QUIET)))
        default = _choices(tool, [])
        base = ["~experiment"] if "experiment" in default else []
        without = _choices(tool, base)
        loader = GlobalHydra.instance().config_loader()
        options = {g: tuple(loader.get_group_options(g)) for g in default}
        for group in TASK_GROUPS:
            options[group] = tuple(o for o in options.get(group, ()) if task_refusal(
                group, compose(overrides=[f"+{group}={o}", *_QUIET])[group], task) is None)
        if base:
            picks = {o: _experiment_choices(tool, o) for o in options["experiment"]}
            options["experiment"] = tuple(o for o, c in picks.items()
                                          if c and all(c.get(g) in options.get(g, ()) for g in TASK_GROUPS))
    return ToolConfig(tool, task, tuple(default), default, without, options)


def _config_text(name: str) -> str:
    path = resources.files(CONFIG_MODULE).joinpath(*name.split("/"))
    return path.read_text() if path.is_file() else ""


def _config_dir() -> str:
    where = resources.files(CONFIG_MODULE)
    return str(Path(str(where)).resolve()) if isinstance(where, Path) else str(where)


def _leading_comment(text: str) -> List[str]:
    """The comment lines at the top of a YAML file, without Hydra's ``# @package`` directive."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        line = line[1:].strip()
        if not line.startswith("@"):
            lines.append(line)
    return lines


def _one_line(lines: Sequence[str], limit: int = 160) -> str:
    """The first comment line; when it breaks off mid-sentence, the sentence up to its end if that is short."""
    if not lines:
        return ""
    first = lines[0]
    if first.endswith((".", ")")):
        return first
    text = " ".join(lines)
    end = re.search(r"(?:(?<=[a-z0-9]{4})|(?<=\)))\.(\s+(?=[A-Z(])|$)", text)  # not after "Reg." or "e.g."
    if end and end.start() < limit:
        return text[:end.start() + 1]
    return first.rstrip(",;:") + " ..."


def option_description(group: str, option: str) -> str:
    """One line about an option: the first comment line of ``mdeq/configs/<group>/<option>.yaml`` ('' without
    one); an option registered in code has its line in ``app.CODE_CONFIGS``."""
    if f"{group}/{option}" in CODE_CONFIGS:
        return CODE_CONFIGS[f"{group}/{option}"]
    return _one_line([line for line in _leading_comment(_config_text(f"{group}/{option}.yaml")) if line])


def program(tool: str, argv0: Optional[str] = None) -> Tuple[str, str]:
    """How the user started ``tool`` (``python tools/train_cls.py``, ``python -m mdeq.cli.train_cls`` or the
    console script ``mdeq-train-cls``), and the same under torchrun."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    module = f"mdeq.cli.{tool}"
    path = Path(argv0)
    if path.suffix == ".py" and path.parent.name == "cli" and path.parent.parent.name == "mdeq":
        return f"python -m {module}", f"torchrun --nproc_per_node=4 -m {module}"
    if path.suffix == ".py":
        return f"python {argv0}", f"torchrun --nproc_per_node=4 {argv0}"
    return path.name or f"mdeq-{tool.replace('_', '-')}", f"torchrun --nproc_per_node=4 -m {module}"


def _command(launcher: str, overrides: Sequence[str], width: int) -> List[str]:
    """The command as shell lines of at most ``width`` columns (continued with a backslash), indented by 2."""
    lines = ["  " + launcher]
    for word in (shlex.quote(o) for o in overrides):
        if len(lines[-1]) + 1 + len(word) + 2 > width:
            lines[-1] += " \\"
            lines.append(" " * 8 + word)
        else:
            lines[-1] += " " + word
    return lines


def _width(width: Optional[int]) -> int:
    if width is not None:
        return width
    return max(80, min(120, shutil.get_terminal_size((100, 24)).columns))


def _wrap(text: str, width: int, first: str = "", rest: str = "") -> List[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)


def help_text(tool: str, argv0: Optional[str] = None, width: Optional[int] = None) -> str:
    """The ``--help`` page of ``tool`` as started by ``argv0`` (default ``sys.argv[0]``)."""
    width = _width(width)
    cfg = tool_config(tool)
    prog, ddp = program(tool, argv0)
    usage = f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...]" + (
        " ['~experiment']" if "experiment" in cfg.groups else "") + " [--cfg job] [--hydra-help]"
    out = _wrap(usage, width, "", " " * (len(prog) + 8)) + [""]
    for line in _leading_comment(_config_text(f"{tool}.yaml")):
        if not line.startswith(("python ", "torchrun ")):
            out += _wrap(line, width) or [""]
    out += ["", "Commands run most:"]
    for ex in EXAMPLES[tool]:
        note = ex.note or option_description("experiment", str(cfg.default.get("experiment"))) or "the default job"
        out += _command(ddp if ex.torchrun else prog, ex.overrides, width)
        out += _wrap(note, width, " " * 6, " " * 6)
    out += [""] + _wrap("Config groups and the options this tool takes: GROUP=OPTION picks "
                        "mdeq/configs/GROUP/OPTION.yaml, KEY=VALUE sets one value (data.root=/data/mine).", width)
    for group in cfg.groups:
        choice, plain = cfg.default[group], cfg.without_experiment.get(group)
        head = f"  {group} (default: {choice}"
        if group != "experiment" and plain != choice:
            head += f"; with ~experiment: {plain}"
        out.append(head + ")")
        names = cfg.options[group]
        column = 4 + max(len(n) for n in names) + 2 if names else 6
        for name in names:
            text = option_description(group, name)
            first = f"    {name}".ljust(column) + text if text else f"    {name}"
            out += _wrap(first, width, "", " " * column)
    out += ["", f"Every setting and its value: {prog} [overrides] --cfg job",
            f"Hydra's own help (multirun, --info, output folders): {prog} --hydra-help",
            f"The config files: {_config_dir()}"]
    return "\n".join(out) + "\n"


def with_help(tool: str, main: Callable[[], None]) -> Callable[[], None]:
    """``main`` of a Hydra tool whose ``--help`` / ``-h`` prints ``help_text`` (``--hydra-help`` stays Hydra's)."""

    def run() -> None:
        if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
            sys.stdout.write(help_text(tool))
            return
        main()

    return run
