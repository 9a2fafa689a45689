"""Measurements behind the project's speed and memory targets (``python -m mdeq.cli.benchmark`` or
``tools/benchmark.py``); they run from an installed package (subprocesses import this very ``mdeq``).

Rooms: ``solvers`` (f-evaluations and overhead ratio on a fixed suite), ``models`` (eval forwards per solver),
``training`` (a training step: DEQ vs unrolled vs HRNet), ``segmentation`` (the segmentation presets at
Cityscapes sizes), ``budget/`` (accuracy against f-evaluations of the DEQ training methods), ``processes``
(fresh-process measurements, memory readings), ``report`` (JSON + Markdown).
"""
