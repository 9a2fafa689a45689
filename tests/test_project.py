"""The README's Quickstart and CI stay in step."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands_install_and_run():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    for cmd in commands:
        assert cmd.startswith("pip install torch==2.14.1 torchvision==0.29.1 -e ")
    assert "tools/" in commands[0] and "pytest" in commands[1]
    assert '".[dev]"' in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quickstart_commands()[1] in ci.splitlines()
    assert "HF_HUB_OFFLINE=1" in ci and "NO_ALBUMENTATIONS_UPDATE=1" in ci
    assert "set -euo pipefail" in ci


def test_main_job_script_exists():
    script = _quickstart_commands()[0].split("&&", 1)[1].split()[1]
    assert (ROOT / script).is_file()


def test_albumentations_1x_argument_names_fail_the_suite():
    """albumentations 2.x ignores 1.x names (value=, mask_value=) with only a warning: mask pads would be 0
    (road). setup.cfg turns that warning into an error for every test."""
    import cv2
    import albumentations as A

    with pytest.raises(UserWarning, match="not valid"):
        A.PadIfNeeded(min_height=8, min_width=8, border_mode=cv2.BORDER_CONSTANT, value=0, mask_value=255)
