"""The Hydra tools' --help (mdeq.engine.tool_help) is generated from the configs: it lists exactly the options a
tool takes (checked here against the tool's own job, run with a stub trainer), each with its YAML file's first
comment line, and its example commands go through the tool's entry point as they are printed. The argparse
tools' --help starts with a description. Nothing trains."""
import functools
import importlib
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "mdeq" / "configs"
TOOLS = ("train_cls", "train_seg", "finetune")
ARGPARSE_TOOLS = ("eval_cls", "eval_seg", "distill", "publish_weights", "convert_official", "benchmark", "export")
WIDTH = 100
QUIET = ("hydra/job_logging=none", "hydra/hydra_logging=none")  # the same app config, composed faster


@functools.lru_cache(maxsize=None)
def _help(tool):
    from mdeq.engine.tool_help import help_text

    return help_text(tool, f"tools/{tool}.py", width=WIDTH)


def _commands(text):
    """The example commands of a help page, as argument lists (continued lines joined, shell quoting undone)."""
    lines = text.splitlines()
    i = lines.index("Commands run most:") + 1
    commands = []
    while lines[i]:
        if re.match(r"^  \S", lines[i]):
            command = lines[i]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i]
            commands.append(shlex.split(command))
        i += 1
    return commands


def _groups(text):
    """{group: {option: description}} of a help page's group list (wrapped descriptions joined)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Config groups"))
    groups, group, option = {}, None, None
    for line in lines[start + 1:]:
        if not line:
            break
        if head := re.match(r"^  (\w+) \(default: ", line):
            group = head.group(1)
            groups[group] = {}
        elif item := re.match(r"^    (\S+)(?:\s+(.*))?$", line):
            option = item.group(1)
            groups[group][option] = item.group(2) or ""
        elif line.startswith("     "):
            groups[group][option] += " " + line.strip()
    return groups


def _first_comment(path):
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return ""
        text = line[1:].strip()
        if text and not text.startswith("@"):
            return text
    return ""


@pytest.fixture
def stub_trainers(monkeypatch):
    """The tools' jobs with the trainers and the process group stubbed: the configs they would train on."""
    from mdeq.engine import app
    from mdeq.engine.distributed import DistEnv

    started = []

    class Trainer:
        def __init__(self, config, env, out, overrides=()):
            started.append(config)

        def fit(self):
            return {}

    for name in ("ClassificationTrainer", "SegmentationTrainer"):
        monkeypatch.setattr(app, name, Trainer)
    monkeypatch.setattr(app, "init_distributed", lambda device: DistEnv())
    monkeypatch.setattr(app, "shutdown_distributed", lambda: None)
    return started


@pytest.fixture
def keep_logging():
    """Hydra's in-process runs configure logging; put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _job(tool):
    from mdeq.engine.app import run_classification, run_segmentation

    return {"train_cls": run_classification, "train_seg": run_segmentation,
            "finetune": functools.partial(run_classification, require_start_weights=True)}[tool]


def _tool_groups(tool):
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{tool}.yaml"))["defaults"]
    return {next(iter(d)) for d in defaults if isinstance(d, dict)}


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_exactly_the_options_the_tool_takes(tool, stub_trainers, tmp_path):
    """Every option of every group in the tool's defaults list is composed with the tool's config (values it
    leaves mandatory filled in, as a user would) and handed to the tool's job: it is listed iff it composes and
    the job does not refuse it as another task's option."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from mdeq.engine.app import register_configs

    listed = _groups(_help(tool))
    assert set(listed) == _tool_groups(tool)
    job = _job(tool)
    weights = ["model.weights=start.pth"] if tool == "finetune" else []
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in sorted(listed):
            takes = []
            for option in loader.get_group_options(group):
                drop = ["~experiment"] if "experiment" in listed and group != "experiment" else []
                try:
                    cfg = compose(tool, overrides=[*drop, f"{group}={option}", *weights, f"output_dir={tmp_path}",
                                                   *QUIET])
                except HydraException:
                    continue
                for key in OmegaConf.missing_keys(cfg):
                    OmegaConf.update(cfg, key, str(tmp_path / "data"))
                try:
                    job(cfg)
                except SystemExit as refused:
                    if "this tool trains" in str(refused):  # the option is for the other task
                        continue
                    # a check that wants a companion setting (deq=fast: model.kwargs.skip_init=true); the
                    # option itself is taken
                    assert "=" in str(refused), str(refused)
                takes.append(option)
            assert sorted(listed[group]) == takes, group
    assert stub_trainers


def test_segmentation_options_are_not_in_the_classification_tools_help():
    for tool in ("train_cls", "finetune"):
        groups = _groups(_help(tool))
        assert not {"loss", "inference"} & set(groups)
        assert not [m for m in groups["model"] if m.startswith("seg_")]
        assert not {"cityscapes", "seg_folder", "synthetic_seg"} & set(groups["data"])
        assert not [e for e in groups.get("experiment", ()) if e.startswith(("cityscapes", "synthetic_seg"))]
    cls = _groups(_help("train_cls"))
    assert {"mdeq_tiny", "mdeq_small"} <= set(cls["model"]) and {"imagenet_small", "digits_tiny"} <= set(
        cls["experiment"])
    seg = _groups(_help("train_seg"))
    assert {"loss", "inference"} <= set(seg) and set(seg["model"]) == {"seg_mdeq_small", "seg_mdeq_large",
                                                                       "seg_mdeq_xl"}
    assert not {"digits", "imagefolder", "cifar10"} & set(seg["data"])
    assert not [e for e in seg["experiment"] if e.startswith(("imagenet", "digits", "cifar"))]


@pytest.mark.parametrize("tool", TOOLS)
def test_each_option_carries_the_first_comment_line_of_its_yaml(tool):
    from mdeq.engine.app import CODE_CONFIGS

    for group, options in _groups(_help(tool)).items():
        for option, description in options.items():
            path = CONFIGS / group / f"{option}.yaml"
            if not path.exists():
                assert description == CODE_CONFIGS[f"{group}/{option}"]
                continue
            first = _first_comment(path)
            # the line; where it breaks off mid-sentence, its first sentence, the sentence it starts, or the line
            # and " ..."
            assert description.startswith(first.rstrip(",;:")[:60]) or (
                description.endswith(".") and first.startswith(description)), (group, option, description)


def test_help_starts_with_what_the_tool_does_then_the_commands_run_most():
    text = _help("train_cls")
    lines = text.splitlines()
    usage = lines[:lines.index("")]
    assert usage[0].startswith("usage: python tools/train_cls.py ") and "--hydra-help" in " ".join(usage)
    assert lines[len(usage) + 1] == _first_comment(CONFIGS / "train_cls.yaml")
    commands = [" ".join(c) for c in _commands(text)]
    assert commands[0] == "python tools/train_cls.py"
    assert "python tools/train_cls.py experiment=imagenet_small data.root=/data/imagenet" in commands
    assert "python tools/train_cls.py ~experiment data=imagefolder data.root=/data/mine model=mdeq_tiny" in commands
    assert any("train.resume=" in c for c in commands)
    assert any(c.startswith("torchrun --nproc_per_node=4 tools/train_cls.py ") for c in commands)
    assert "'~experiment'" in text  # quoted for the shell, as printed
    assert all(len(line) <= WIDTH or " " not in line.strip() for line in lines if not line.startswith("The config"))


@pytest.mark.parametrize("tool", TOOLS)
def test_the_example_commands_run_through_the_tool(tool, stub_trainers, keep_logging, tmp_path, monkeypatch):
    """Each printed command (launcher removed) is the command line of the tool's real main(): Hydra parses and
    composes it, the tool's checks pass, and its job starts (a stub trainer)."""
    module = importlib.import_module(f"mdeq.cli.{tool}")
    monkeypatch.chdir(tmp_path)
    commands = _commands(_help(tool))
    assert len(commands) >= 4
    for command in commands:
        assert command[0] in ("python", "torchrun"), command
        launcher = command.index(f"tools/{tool}.py") + 1
        monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", *command[launcher:]])
        before = len(stub_trainers)
        module.main()
        assert len(stub_trainers) == before + 1, command
        config = stub_trainers[-1]
        for override in command[launcher:]:
            key, _, value = override.partition("=")
            if "." in key and not value.startswith("["):
                node = config
                for part in key.split("."):
                    node = node[part]
                assert str(node).lower() == value.lower(), override


@pytest.mark.parametrize("argv0, prog, ddp", [
    ("tools/train_cls.py", "python tools/train_cls.py", "torchrun --nproc_per_node=4 tools/train_cls.py"),
    ("/site-packages/mdeq/cli/train_cls.py", "python -m mdeq.cli.train_cls",
     "torchrun --nproc_per_node=4 -m mdeq.cli.train_cls"),
    ("/usr/local/bin/mdeq-train-cls", "mdeq-train-cls", "torchrun --nproc_per_node=4 -m mdeq.cli.train_cls"),
])
def test_the_commands_are_written_the_way_the_tool_was_started(argv0, prog, ddp):
    from mdeq.engine.tool_help import program

    assert program("train_cls", argv0) == (prog, ddp)


def test_help_flags_print_the_generated_page_and_hydra_help_stays_hydras(capsys, keep_logging, monkeypatch,
                                                                         tmp_path):
    module = importlib.import_module("mdeq.cli.train_cls")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", str(WIDTH))  # the page's width (pytest-xdist workers get COLUMNS=80)
    for flag in ("--help", "-h"):
        monkeypatch.setattr(sys, "argv", ["tools/train_cls.py", "experiment=imagenet_small", flag])
        module.main()
        assert capsys.readouterr().out == _help("train_cls")
    monkeypatch.setattr(sys, "argv", ["tools/train_cls.py", "--hydra-help"])
    try:
        module.main()
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "Hydra" in out and "== Flags ==" in out and "Commands run most" not in out


@pytest.mark.parametrize("name", ARGPARSE_TOOLS)
def test_argparse_tools_help_starts_with_a_description(name, capsys):
    module = importlib.import_module(f"mdeq.cli.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[0].startswith("usage: ")
    description = paragraphs[1].strip()
    assert description and not description.startswith(("positional arguments", "options")), description
    assert len(description.split()) >= 5
