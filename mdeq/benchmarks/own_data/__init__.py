"""Own-data benchmark (``tools/benchmark.py owndata``): what a user bringing their own images gets from the
README's own-data command, against a hand-tuned recipe and explicit baselines trained by the same command.

Every run is ``python -m mdeq.cli.train_cls '~experiment' data=imagefolder data.root=<data set>`` plus the variant's
overrides (``VARIANTS``), at each epoch count (default 3 and the own-data default, 10), in a fresh subprocess:

=================  ==========================================================================================
variant            overrides
=================  ==========================================================================================
defaults           none: mdeq_tiny with the own-data defaults (data-aware input size and crops, ...)
before             the previous release's own-data defaults, restored by overrides (``BEFORE``): ImageNet's crops and
                   flips at the model's cfg size, the preset's dropout, no precise BN, batch 32 (at 3 epochs only)
tuned              the best recipe found by hand for that data set (``TUNED``; each entry says how it was found)
fast               ``deq=fast``: the fast recipe (Skip DEQ start, Anderson 4, one-step gradient), evaluated at
                   exactly 1, 2 and 4 f-evaluations (``FAST_BUDGETS``; the Skip DEQ start, then f)
resnet18           ``model.name=resnet18``
hrnet_w18_small    ``model.name=hrnet_w18_small``: the explicit multiscale network (HRNet)
small_cnn          ``model.name=test_byobnet``: a small explicit ResNet-style network with about mdeq_tiny's
                   parameter count (0.20M against 0.16M)
=================  ==========================================================================================

Reported per run: val top-1 of the final weights, ``train_seconds`` (the run's training time, without validation),
parameters. Seeds move a run more than a point (the digits' 359 val images: one image = 0.28 points, and two seeds
of the same command ended 1.1 points apart; LFW's 40: one image = 2.5 points), so the runs repeat over ``SEEDS``
(``train.seed``) and the table gives the mean (and the range). A run whose folder holds a metrics.json and the
record of the same command is reused (``retrain`` trains again), so an interrupted benchmark goes on where it
stopped. Time only on an idle machine: the runs are sequential, each with the machine's cores.

Rooms: ``datasets`` (the real image sets, written once from the packages that ship them).
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..processes import launch
from ..report import with_provenance
from .datasets import DATASETS, prepare

__all__ = ["Variant", "VARIANTS", "TUNED", "BEFORE", "FAST_BUDGETS", "SEEDS", "DEFAULT_EPOCHS", "DATASETS", "run",
           "to_markdown", "save", "train_command"]

FAST_BUDGETS = (1, 2, 4)
SEEDS: Dict[str, Tuple[int, ...]] = {"digits": (42, 1, 2), "lfw": (42, 1, 2)}  # default: (42,), train.seed's
DEFAULT_EPOCHS: Tuple[Optional[int], ...] = (3, None)  # None: the own-data default (train.epochs of train_cls.yaml)
RECORD = "owndata_run.json"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: Tuple[str, ...]
    budgets: Tuple[int, ...] = ()  # f-evaluation budgets the final weights are also evaluated at
    only_epochs: Optional[Tuple[Optional[int], ...]] = None  # the epoch counts it runs at (None: every one asked)


# The previous release's own-data defaults (mdeq-zoo 0.1.0 before issue 19), as overrides of today's
BEFORE = ("data.overrides.input_size=null", "data.overrides.crop_pct=null", "data.aug.policy=rrc",
          "data.aug.scale=[0.08,1.0]", "data.aug.ratio=[0.75,1.3333333]", "data.aug.hflip=0.5", "data.batch_size=32",
          "model.kwargs.dropout=null", "train.precise_bn_batches=0")

VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("defaults", "mdeq_tiny, own-data defaults", ()),
    Variant("before", "mdeq_tiny, the previous defaults", BEFORE, only_epochs=(3,)),
    Variant("tuned", "mdeq_tiny, hand-tuned recipe", ()),  # the data set's TUNED overrides
    Variant("fast", "mdeq_tiny, fast recipe (deq=fast)", ("deq=fast",), FAST_BUDGETS),
    Variant("resnet18", "resnet18 (explicit)", ("model.name=resnet18",)),
    Variant("hrnet_w18_small", "hrnet_w18_small (explicit multiscale)", ("model.name=hrnet_w18_small",)),
    Variant("small_cnn", "test_byobnet (explicit, ~mdeq_tiny's size)", ("model.name=test_byobnet",)),
)}

# The hand-tuned recipe of each data set: the digits recipe's knowledge (experiment/digits_tiny.yaml: mild
# random-resized crops without flips, Adam 2e-3, 4 unrolled layers over a sixth of the run, the Jacobian penalty on
# half of the steps, no dropout, precise BN, 16x16 for these small images), and variations of it tried by hand; the
# best found is kept (README, "Your own data", lists every variant tried).
_DIGITS_RECIPE = ("data.aug.policy=rrc", "data.aug.scale=[0.85,1.0]", "data.aug.ratio=[0.9,1.1]", "data.aug.hflip=0.0",
                  "optim.lr=2e-3", "schedule.unroll_steps=4", "schedule.pretrain_fraction=0.17")
TUNED: Dict[str, Tuple[str, ...]] = {
    "digits": _DIGITS_RECIPE,
    "mnist5k": _DIGITS_RECIPE + ("data.overrides.input_size=16",),  # the 97.3% setting: at 16x16
    "lfw": _DIGITS_RECIPE + ("data.aug.hflip=0.5",),  # faces and non-faces flip: 99.4% at 3 epochs against 93.3%
}


def train_command(data_root: Path, variant: Variant, dataset: str, epochs: Optional[int], run_dir: Path,
                  seed: int = 42) -> List[str]:
    overrides = list(TUNED.get(dataset, ())) if variant.name == "tuned" else list(variant.overrides)
    cmd = [sys.executable, "-m", "mdeq.cli.train_cls", "~experiment", "data=imagefolder", f"data.root={data_root}",
           *overrides, f"hydra.run.dir={run_dir}", "train.progress=false"]
    return cmd + ([f"train.epochs={epochs}"] if epochs is not None else []) + (
        [f"train.seed={seed}"] if seed != 42 else [])


def _read(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _budget_top1(run_dir: Path, budgets: Sequence[int]) -> List[Dict[str, float]]:
    """Top-1 of the run's final weights at exactly ``budgets`` f-evaluations each, the head seeing the last one's output
    (the accuracy-vs-compute benchmark's axis, ``budget.evaluate_method``; ``eval_cls.py --sweep-iters`` sweeps the
    solver's ``max_iter`` instead, whose answer is its lowest-residual iterate: with one step, the start itself)."""
    from ..budget.evaluation import evaluate_method

    res = evaluate_method(run_dir / "checkpoints" / "last.pth", evals=list(budgets))
    return [dict(evals=int(r["evals"]), nfe=int(r["nfe"]), top1=float(r["top1"])) for r in res["budgets"]]


def run(datasets: Sequence[str] = tuple(DATASETS), variants: Sequence[str] = tuple(VARIANTS),
        epochs: Sequence[Optional[int]] = DEFAULT_EPOCHS, runs_dir: Path = Path("results/benchmarks/owndata_runs"),
        retrain: bool = False, progress: Callable[[str], None] = print) -> Dict:
    """Train (or reuse) every (data set, variant, epochs) run; returns the rows of the report."""
    rows = []
    for dataset in datasets:
        root = prepare(dataset)
        for name in variants:
            variant = VARIANTS[name]
            runs = [e for e in epochs if variant.only_epochs is None or e in variant.only_epochs]
            for ep, seed in ((e, s) for e in runs for s in SEEDS.get(dataset, (42,))):
                run_dir = runs_dir / dataset / (f"{name}_{'default' if ep is None else f'e{ep}'}" +
                                                ("" if seed == 42 else f"_seed{seed}"))
                cmd = train_command(root, variant, dataset, ep, run_dir, seed)
                command = shlex.join(cmd[1:])
                record = _read(run_dir / RECORD)
                if retrain or not (record and record.get("command") == command and
                                   (run_dir / "metrics.json").is_file()):
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    progress(f"[owndata] {dataset} {name} epochs={ep or 'default'} seed={seed}: {command}")
                    res = launch(cmd, runs_dir / dataset / f"{run_dir.name}.log")
                    res.update(command=command, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
                    if res["returncode"] != 0:
                        rows.append(dict(dataset=dataset, variant=name, epochs=ep, seed=seed,
                                         error=f"exit {res['returncode']}; see "
                                               f"{runs_dir / dataset / (run_dir.name + '.log')}"))
                        continue
                    (run_dir / RECORD).write_text(json.dumps(res, indent=2))
                    record = res
                if variant.budgets and [b.get("evals") for b in record.get("budget_top1") or []] != list(
                        variant.budgets):  # not evaluated yet (or by an earlier sweep): the weights are there
                    record["budget_top1"] = _budget_top1(run_dir, variant.budgets)
                    (run_dir / RECORD).write_text(json.dumps(record, indent=2))
                m = _read(run_dir / "metrics.json") or {}
                rows.append(dict(dataset=dataset, variant=name, label=variant.label, epochs=m.get("epochs", ep),
                                 seed=seed, val_top1=m.get("val_top1"), train_seconds=m.get("train_seconds"),
                                 parameters=m.get("parameters"), model=m.get("model"), command=command,
                                 budget_top1=list(record.get("budget_top1") or []),
                                 data_choices=(m.get("data_choices") or {}).get("reasons"),
                                 warnings=m.get("warnings")))
    return dict(rows=rows, datasets={d: DATASETS[d].description for d in datasets},
                tuned={d: list(TUNED.get(d, ())) for d in datasets})


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def to_markdown(result: Dict) -> str:
    """One table per data set: each variant's top-1 and training seconds at each epoch count (means over the seeds,
    the range in brackets when there are several)."""
    lines: List[str] = []
    for dataset, description in result["datasets"].items():
        rows = [r for r in result["rows"] if r["dataset"] == dataset]
        counts = sorted({r["epochs"] for r in rows if r.get("epochs") is not None})
        seeds = sorted({r.get("seed", 42) for r in rows})
        lines += [f"**{dataset}**: {description}" + (f" (mean of seeds {', '.join(map(str, seeds))})"
                                                      if len(seeds) > 1 else ""), "",
                  "| model / recipe | parameters | " + " | ".join(f"top-1 @ {e} ep | train s @ {e} ep" for e in counts)
                  + " |", "|---|---:|" + "---:|---:|" * len(counts)]
        for name in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == name and not r.get("error")]
            params = next((f"{r['parameters'] / 1e6:.2f}M" for r in mine if r.get("parameters")), "-")
            cells = []
            for e in counts:
                runs = [r for r in mine if r["epochs"] == e]
                if not runs:
                    cells += ["-", "-"]
                    continue
                top1s = [r["val_top1"] for r in runs]
                top1 = f"{_mean(top1s):.1f}" + (f" [{min(top1s):.1f}-{max(top1s):.1f}]" if len(runs) > 1 else "")
                at = {}
                for r in runs:
                    for b in r.get("budget_top1") or []:
                        at.setdefault(b["evals"], []).append(b["top1"])
                if at:
                    top1 += " (" + ", ".join(f"@{k}: {_mean(v):.1f}" for k, v in sorted(at.items())) + ")"
                cells += [top1, f"{_mean([r['train_seconds'] for r in runs]):.0f}"]
            lines.append(f"| {VARIANTS[name].label} | {params} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save(result: Dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "owndata.json", markdown=out / "owndata.md")
    paths["json"].write_text(json.dumps(with_provenance(result), indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(result) + "\n")
    return paths
