"""Training the methods of the budget benchmark: one subprocess per training (``--jobs`` at once; cdeq waits for
plain), its wall time and peak memory, and the reuse of runs that finished with the same command and recipe."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ...engine.app import CONFIG_MODULE, register_configs
from ...engine.model_config import without_needless_plus
from ..processes import launch, package_env
from .methods import METHODS, count_images, distill_command, split_overrides, train_command

__all__ = ["RECORD", "train_methods", "memory_rows", "read_json", "recipe_changed"]

RECORD = "budget_train.json"


def recipe_changed(cmd: List[str], run_dir: Path) -> bool:
    """Whether ``train_cls`` would now compose another job config from ``cmd`` than the run's ``.hydra/config.yaml``
    (a recipe or config file was edited since the run)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return True
    register_configs()
    job = without_needless_plus([o for o in cmd[3:] if not o.lstrip("+~").startswith("hydra.")])  # as the tool
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        now = OmegaConf.to_container(compose(config_name="train_cls", overrides=job), resolve=False)
    return now != OmegaConf.to_container(OmegaConf.load(saved), resolve=False)



def read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

def train_methods(methods: Sequence[str], runs_dir: Path, epochs: Optional[int] = None,
                  data_root: Optional[Path] = None, distill_epochs: int = 10, evals: Sequence[int] = (1, 2, 4, 8, 16),
                  jobs: int = 1, threads: int = 1, retrain: bool = False, train_overrides: Sequence[str] = (),
                  distill_args: Sequence[str] = (), progress: Callable[[str], None] = print) -> Dict[str, Dict]:
    """Train (or reuse) every method; returns per method its run folder, command, times and peak memory."""
    scoped = split_overrides(train_overrides)
    train_images = count_images(data_root) if data_root is not None else None
    runs_dir.mkdir(parents=True, exist_ok=True)
    info: Dict[str, Dict] = {}
    commands: Dict[str, List[str]] = {}
    for name in methods:
        m, run_dir = METHODS[name], runs_dir / name
        if m.recipe is None:
            commands[name] = distill_command(runs_dir / "plain" / "checkpoints" / "last.pth", run_dir,
                                             distill_epochs, evals, data_root, distill_args)
        else:
            commands[name] = train_command(m, run_dir, epochs, data_root,
                                           scoped.get(None, []) + scoped.get(name, []), train_images)
        info[name] = dict(run_dir=str(run_dir), command=shlex.join(commands[name][1:]),
                          log=str(runs_dir / f"{name}.log"))

    def reusable(name: str) -> bool:
        record = read_json(runs_dir / name / RECORD)
        if not (not retrain and (runs_dir / name / "metrics.json").is_file() and record is not None
                and record.get("command") == info[name]["command"] and record.get("returncode") == 0):
            return False
        if METHODS[name].recipe is not None and recipe_changed(commands[name], runs_dir / name):
            progress(f"[budget] {name}: its recipe composes another config than the finished run's: training again")
            return False
        return True

    todo = [n for n in methods if not reusable(n)]
    if "cdeq" in methods and "plain" in todo and "cdeq" not in todo:
        todo.append("cdeq")  # a new teacher: distil again
    for name in methods:
        if name not in todo:
            info[name].update(read_json(runs_dir / name / RECORD) or {}, reused=True)
            progress(f"[budget] {name}: reusing {runs_dir / name} (metrics.json present; --retrain trains it again)")
    failed: set = set()
    lock = threading.Lock()

    def job(name: str) -> Dict:
        run_dir = runs_dir / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-finished or outdated run: start over
        with lock:
            progress(f"[budget] {name}: started  {info[name]['command']}")
        res = launch(commands[name], Path(info[name]["log"]), threads)
        res.update(command=info[name]["command"], threads=threads, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        if res["returncode"] == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RECORD).write_text(json.dumps(res, indent=2))
        return res

    pending = [n for n in methods if n in todo]
    running: Dict = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for name in list(pending):
                if len(running) >= max(1, jobs):
                    break
                if name == "cdeq" and ("plain" in pending or any(v == "plain" for v in running.values())):
                    continue  # the teacher is not ready yet
                pending.remove(name)
                if name == "cdeq" and "plain" in failed:
                    info[name].update(reused=False, returncode=None, error="its teacher (plain) failed to train")
                    failed.add(name)
                    continue
                running[pool.submit(job, name)] = name
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                res = fut.result()
                info[name].update(res, reused=False)
                if res["returncode"] != 0:
                    failed.add(name)
                    info[name]["error"] = f"exit code {res['returncode']}; see {info[name]['log']}"
                with lock:
                    progress(f"[budget] {name}: {'done' if res['returncode'] == 0 else 'FAILED'} in "
                             f"{res['wall_s']:.0f} s, process peak {res['peak_mb']:.0f} MB")
    for name in methods:
        metrics = read_json(runs_dir / name / "metrics.json")
        if metrics is not None and not info[name].get("error"):
            info[name]["train_seconds"] = round(float(metrics.get("distill_seconds", metrics.get("train_seconds"))), 1)
            info[name]["recipe_val_top1"] = metrics.get("val_top1")
    return info

def memory_rows(configs: List[Dict], size: int, batch: int, threads: int, progress: Callable[[str], None]) -> Dict:
    """``training.run`` from a fresh interpreter: its per-configuration processes are forked from a small parent.

    ``training.run_one``'s CPU peak is the growth of ``ru_maxrss``, which Linux floors at the RSS of the process
    that forked it (the pre-exec high-water mark is kept), so run from this process, grown by the evaluations,
    every configuration would report about the same peak.
    """
    args = dict(configs=configs, size=size, batch=batch, repeats=2, threads=threads)
    code = ("import json,sys; from mdeq.benchmarks import training; a = json.loads(sys.argv[1]); "
            "r = training.run(a.pop('configs'), progress=lambda s: print(s, flush=True), **a); "
            "print('RESULT ' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          env=package_env())
    lines = proc.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            progress(line)
    results = [ln for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"the memory benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT "):])
