"""Every ```python and ```bash (```sh, ```shell) block of README.md and docs/**/*.md runs, and must pass.

Sybil parses the pages (its markdown ``PythonCodeBlockParser`` and ``SkipParser``, plus ``CodeBlockParser`` with
``run_shell`` below for shell blocks); each code block is one test, ``test_doc_example[<page>:<line>]``.

* Each page runs in its own temporary folder (nothing is written into the checkout), which holds a ``tools``
  link to the checkout's ``tools/``, with ``HF_HUB_OFFLINE=1``, ``NO_ALBUMENTATIONS_UPDATE=1`` and temporary data
  and weights caches (``MDEQ_DATA``, ``MDEQ_ZOO_CACHE``), so a page's blocks can use the files its earlier
  blocks wrote. Torch runs one thread (``OMP_NUM_THREADS=1`` for the shell blocks' tools).
* Python blocks of one page share one namespace, in page order. Shell blocks run with ``bash -euo pipefail``.
* Each test first runs the page's earlier Python blocks that have not run in this process, so a block passes
  or fails the same way whether the page's blocks run in one process or are spread over pytest-xdist workers.
* ``<!-- skip: next "reason" -->`` before a block skips it with that reason (shown by ``pytest -ra``);
  ``<!-- skip: start "reason" -->`` ... ``<!-- skip: end -->`` skips every block between. Blocks of other
  languages (```text, ```console: output) are not run.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from sybil import Document, Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = ("bash", "sh", "shell")
SHELL_TIMEOUT = 600

# where the running shell block executes: set by the test just before it evaluates the block
_shell_context: Dict[str, object] = {}


def run_shell(example: Example) -> Optional[str]:
    """Sybil evaluator of a shell block: bash -euo pipefail in the test's folder; a message on failure."""
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", example.parsed], cwd=_shell_context["cwd"],
                          env=_shell_context["env"], capture_output=True, text=True, timeout=SHELL_TIMEOUT)
    if proc.returncode != 0:
        return (f"exit status {proc.returncode}\n--- stdout (end) ---\n{proc.stdout[-4000:]}\n"
                f"--- stderr (end) ---\n{proc.stderr[-6000:]}")
    return None


SKIP = SkipParser()
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), *(CodeBlockParser(lang, run_shell) for lang in SHELLS), SKIP])


class Block:
    """One code block of a page: its example, kind ('python' or 'shell') and skip reason."""

    def __init__(self, page: str, index: int, example: Example, kind: str, skip: Optional[str]):
        self.page, self.index, self.example, self.kind, self.skip = page, index, example, kind, skip

    @property
    def id(self) -> str:
        return f"{self.page}:{self.example.line}"


def _skip_reason(parsed, where: str) -> Optional[str]:
    action, reason = parsed
    if action == "end":
        return None
    if not reason:
        raise ValueError(f"{where}: 'skip: {action}' needs a reason: <!-- skip: {action} \"needs a GPU\" -->")
    try:
        return str(ast.literal_eval(reason))
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: the reason of 'skip: {action}' must be a quoted string, not {reason}") from None


def parse_page(path: Path) -> List[Block]:
    """The code blocks of a page in order, each with the reason of the skip marker that applies to it."""
    page = path.relative_to(ROOT).as_posix()
    document: Document = SYBIL.parse(path)
    blocks, pending, in_range = [], None, None
    for example in document.examples():
        where = f"{page}:{example.line}"
        if example.region.evaluator is SKIP.skipper:
            action = example.parsed[0]
            if action == "next":
                pending = _skip_reason(example.parsed, where)
            elif action == "start":
                in_range = _skip_reason(example.parsed, where)
            elif action == "end":
                in_range = None
            else:
                raise ValueError(f"{where}: unknown skip action {action!r} (next, start or end)")
            continue
        kind = "shell" if example.region.evaluator is run_shell else "python"
        blocks.append(Block(page, len(blocks), example, kind, pending or in_range))
        pending = None
    if pending is not None or in_range is not None:
        raise ValueError(f"{page}: a skip marker with no code block after it")
    return blocks


BLOCKS = {path.relative_to(ROOT).as_posix(): parse_page(path) for path in PAGES}
CASES = [pytest.param(block.page, block.index, id=block.id,
                      marks=[pytest.mark.skip(reason=f"{block.id}: {block.skip}")] if block.skip else [])
         for blocks in BLOCKS.values() for block in blocks]

# per process: which Python blocks of a page have run, the first that failed, the page's folder
_page_state: Dict[str, dict] = {}


@pytest.fixture(scope="session")
def doc_caches(tmp_path_factory) -> Dict[str, str]:
    """Data and weights caches for the examples (one per test process)."""
    return {"MDEQ_DATA": str(tmp_path_factory.mktemp("doc-data")),
            "MDEQ_ZOO_CACHE": str(tmp_path_factory.mktemp("doc-weights"))}


def _environment(caches: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", **caches)
    # one thread per tool: on a busy machine (other tests, pytest-xdist workers) torch's thread pool spins and a
    # tool that takes 6 s alone took 66 s; the tools' own tests do the same (tests/tools/conftest.py)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_python(block: Block, state: dict) -> None:
    try:
        block.example.evaluate()
    except BaseException:
        state["failed"] = block.id
        raise
    finally:
        state["done"].add(block.index)


@pytest.fixture
def one_thread():
    """Python blocks run on one torch thread, like the shell blocks' tools (see ``_environment``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page,index", CASES)
def test_doc_example(page, index, doc_caches, tmp_path_factory, monkeypatch, one_thread):
    block = BLOCKS[page][index]
    state = _page_state.setdefault(page, {"done": set(), "failed": None, "dir": None})
    if state["dir"] is None:
        state["dir"] = tmp_path_factory.mktemp("doc-" + page.replace("/", "-").replace(".", "-"))
        (state["dir"] / "tools").symlink_to(ROOT / "tools", target_is_directory=True)
    monkeypatch.chdir(state["dir"])
    for name, value in doc_caches.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    if block.index in state["done"]:  # already run in this process, to build a later block of the page
        if state["failed"] == block.id:
            pytest.fail(f"{block.id} failed when a later block of the page ran it first", pytrace=False)
        return
    for before in BLOCKS[page][:index]:
        if state["failed"]:
            break
        if before.kind == "python" and not before.skip and before.index not in state["done"]:
            try:
                _run_python(before, state)
            except Exception:
                pass  # reported below (and by its own test)
    if state["failed"]:
        pytest.fail(f"{block.id} builds on the page's earlier Python blocks, and the one at {state['failed']} "
                    f"failed", pytrace=False)
    if block.kind == "shell":
        _shell_context.update(cwd=str(state["dir"]), env=_environment(doc_caches))
        block.example.evaluate()
    else:
        _run_python(block, state)
