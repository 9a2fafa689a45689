"""The README's Quickstart, the documentation site and CI stay in step."""
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


def test_ci_builds_the_docs_strictly_after_the_tests():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    docs = [i for i, line in enumerate(lines) if "mkdocs build" in line and not line.lstrip().startswith("#")]
    assert len(docs) == 1, "one mkdocs build line in .ci/run"
    line = lines[docs[0]]
    assert line.startswith('pip install -e ".[docs]" && mkdocs build --strict'), line
    assert "--site-dir" in line, "the site is built outside the checkout"
    assert lines.index(_quickstart_commands()[1]) < docs[0]


def test_readme_is_a_front_door_into_the_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert 'pip install -e ".[docs]" && mkdocs serve' in readme
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_every_docs_page_is_in_the_site_navigation():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (pages(value) if isinstance(value, list) else [value])

    in_nav = set(pages(config["nav"]))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav, (sorted(on_disk - in_nav), sorted(in_nav - on_disk))
    assert "docs/hooks/cli_help.py" in config["hooks"]


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


def _import_graph():
    """Module -> modules it imports (every import, also inside functions), and the private names imported across
    modules, for the packages mdeq and zoo."""
    import ast

    files = {}
    for pkg in ("mdeq", "zoo"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph, private = {}, []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + [node.module] if node.module else base) if node.level else node.module
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    dest = full if full in files else target
                    if dest in files and dest != mod:
                        edges.add(dest)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target in files \
                            and target != mod:
                        private.append(f"{mod} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files and a.name != mod}
        graph[mod] = {d for d in edges if not (is_pkg and d.startswith(mod + "."))}
    return graph, private


def test_no_import_cycles_and_no_private_imports_across_modules():
    graph, private = _import_graph()
    assert not private, private
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "active"
        for dest in sorted(graph.get(mod, ())):
            if state.get(dest) == "active":
                cycles.append(stack[stack.index(dest):] + [dest])
            elif dest not in state:
                visit(dest, stack + [dest])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles


def test_the_package_needs_no_checkout():
    """Benchmarks and programs run from an installed package: no paths into the checkout's tools/ or configs/."""
    import re

    for path in (ROOT / "mdeq").rglob("*.py"):
        code = path.read_text()
        assert not re.search(r"""(ROOT|\])\s*/\s*["'](tools|configs)["']""", code), path
    assert (ROOT / "mdeq" / "configs" / "train_cls.yaml").is_file()
    assert '"mdeq.configs": ["*.yaml", "*/*.yaml"]' in (ROOT / "setup.py").read_text()
