import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_solver_benchmark_writes_json_and_markdown(tmp_path, capsys):
    assert _load_tool().main(["solvers", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "solvers.json").read_text())
    rows = {(r["problem"], r["solver"]): r for r in result["rows"]}
    problems = [p["name"] for p in result["problems"]]
    assert problems == ["linear_rho0.9", "sym_conv_0.95", "mdeq_block"]
    for prob in problems:
        for solver in ("fixed_point", "anderson", "broyden"):
            row = rows[(prob, solver)]
            assert row["converged"] == 1.0 and row["nfe"] >= row["mean_nstep"] > 0
            assert row["overhead_ratio"] > 0 and row["wall_ms"] > 0
        # Anderson needs fewer evaluations than plain iteration on every problem of the suite
        assert rows[(prob, "anderson")]["nfe"] < rows[(prob, "fixed_point")]["nfe"]
    table = (tmp_path / "solvers.md").read_text()
    assert "| mdeq_block | anderson |" in table
    assert "wrote" in capsys.readouterr().out
