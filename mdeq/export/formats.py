"""Writing a fixed-budget module to a file and running the file: ONNX, torch.export (.pt2) or TorchScript (.pt).

Every format gets a dynamic batch dimension (the example's batch size does not matter; 2 or more avoids
torch.export's specialisation of size 1); height and width stay those of the example. A module with several
inputs (the streaming ``FixedBudgetStream``: frames, state, fresh) takes a tuple of examples and names its inputs
and outputs in ``input_names`` / ``output_names``; every input shares the batch dimension. Files are written to a
temporary name and moved into place, so a failed export leaves nothing behind. ONNX needs the ``export`` extra
(onnx, onnxscript; onnxruntime to run the file).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["FORMATS", "export_format", "save_exported", "export_program", "run_exported"]

FORMATS = {"onnx": ".onnx", "export": ".pt2", "torchscript": ".pt"}  # format -> its file suffix
_BY_SUFFIX = {suffix: fmt for fmt, suffix in FORMATS.items()}


def export_format(path: Union[str, Path], fmt: Optional[str] = None) -> str:
    """``fmt`` if given (one of ``FORMATS``), else the format that the suffix of ``path`` names."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
        return fmt
    suffix = Path(path).suffix
    if suffix not in _BY_SUFFIX:
        raise ValueError(f"cannot tell the format from {str(path)!r}: use a suffix "
                         f"{', '.join(f'{s} ({f})' for f, s in FORMATS.items())} or give the format")
    return _BY_SUFFIX[suffix]


Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_tuple(example: Inputs) -> Tuple[torch.Tensor, ...]:
    return (example,) if isinstance(example, torch.Tensor) else tuple(example)


def save_exported(module: nn.Module, path: Union[str, Path], example: Inputs, fmt: Optional[str] = None) -> Path:
    """Write ``module`` (e.g. ``fixed_budget(model, k)``), traced on ``example`` images, to ``path``.

    ``onnx``: ``torch.onnx.export`` (dynamo), input ``images``, output ``output`` (or the module's
    ``input_names`` / ``output_names``); ``export``: ``torch.export.export`` saved with ``torch.export.save``;
    ``torchscript``: ``torch.jit.trace``. ``example``: a tensor, or a tuple for a module of several inputs.
    """
    fmt = export_format(path, fmt)
    example = _as_tuple(example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, prefix=f".{path.stem}.", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                with warnings.catch_warnings():  # inputs sharing the batch dimension is what is meant
                    warnings.filterwarnings("ignore", r".*The axis name: batch will not be used", UserWarning)
                    program = torch.onnx.export(module, example, dynamo=True,
                                                input_names=list(getattr(module, "input_names", ("images",))),
                                                output_names=list(getattr(module, "output_names", ("output",))),
                                                dynamic_shapes=_batch_dims(len(example)), verbose=False)
                program.save(tmp, external_data=False)
            elif fmt == "export":
                torch.export.save(export_program(module, example), tmp)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the tracer's notes on Python ints (sizes are fixed but batch)
                    torch.jit.trace(module, example, check_trace=False).save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def export_program(module: nn.Module, example: Inputs) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` with a dynamic batch dimension (shared by all inputs)."""
    example = _as_tuple(example)
    with torch.no_grad():
        return torch.export.export(module.eval(), example, dynamic_shapes=_batch_dims(len(example)))


def run_exported(path: Union[str, Path], inputs: Inputs, fmt: Optional[str] = None) -> Any:
    """Run a file written by ``save_exported`` on ``inputs`` (images, or the tuple the module takes; ONNX in
    onnxruntime, on the CPU); one output comes back as a tensor, several as a tuple."""
    fmt = export_format(path, fmt)
    inputs = _as_tuple(inputs)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (not its notes on nodes it could not constant-fold)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
        outs = tuple(torch.from_numpy(o) for o in session.run(None, feed))
        return outs[0] if len(outs) == 1 else outs
    with torch.no_grad():
        if fmt == "export":
            return torch.export.load(str(path)).module()(*inputs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location=inputs[0].device)(*inputs)


def _batch_dims(n: int):
    """Dynamic shapes of ``n`` inputs: dimension 0 of every one is the (one) batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    return tuple({0: batch} for _ in range(n))
