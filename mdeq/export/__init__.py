"""Deployment: an MDEQ at a fixed budget of f-evaluations as a plain module, and its files.

    from mdeq.export import fixed_budget, save_exported
    net = fixed_budget(model, 4)              # images -> what model returns, with 4 f-evaluations
    net = fixed_budget(model, 2, stream=True) # (frames, state, fresh) -> (output, state, fresh): video
    save_exported(net, "model.onnx", images)  # or .pt2 (torch.export), .pt (TorchScript)

Rooms: ``static`` (``fixed_budget``: the static graph of each solver at a budget), ``formats`` (writing and
running .onnx / .pt2 / .pt files).
"""
from .formats import FORMATS, export_format, export_program, run_exported, save_exported
from .static import (EXPORTABLE_SOLVERS, BudgetPlan, FixedBudgetModel, FixedBudgetStage, FixedBudgetStream,
                     budget_reference, fixed_budget)

__all__ = ["fixed_budget", "budget_reference", "FixedBudgetModel", "FixedBudgetStream", "FixedBudgetStage",
           "BudgetPlan", "EXPORTABLE_SOLVERS", "FORMATS", "export_format", "save_exported", "export_program",
           "run_exported"]
