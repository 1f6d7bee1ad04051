"""Packaging facts: the extras load together in one process, formulations install under the package."""

import subprocess
import sys

import pytest

IMPORT_ORDERS = {
    "ortools first": "import ortools.graph.python.min_cost_flow, ortools.sat.python.cp_model, highspy, pulp",
    "highspy first": "import highspy, pulp, ortools.graph.python.min_cost_flow, ortools.sat.python.cp_model",
}


@pytest.mark.parametrize("order", sorted(IMPORT_ORDERS))
def test_ortools_highspy_and_pulp_solve_in_one_process(order):
    code = IMPORT_ORDERS[order] + """
import pulp
from alignment_solver import solve
from alignment_solver.instances import random_problem
p = random_problem(30, 4, seed=1, budget=True)
values = {b: solve(p, backend=b).objective for b in ("cpsat", "pulp_cbc", "pulp_highs")}
values["flow"] = solve(random_problem(30, 4, seed=1)).objective
assert len({round(v, 6) for k, v in values.items() if k != "flow"}) == 1, values
h = pulp.LpProblem("t", pulp.LpMaximize); v = pulp.LpVariable("v", 0, 3, cat="Integer"); h += v; h += v <= 2.5
assert h.solve(pulp.HiGHS(msg=False)) == 1 and v.value() == 2
assert h.solve(pulp.PULP_CBC_CMD(msg=False)) == 1 and v.value() == 2
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_formulations_install_as_a_subpackage():
    import alignment_solver.formulations.flow as flow
    import alignment_solver.formulations.milp as milp

    assert flow.FlowNetwork and milp.LinearModel


def test_the_example_round_ships_inside_the_package():
    from importlib import resources

    assert resources.files("alignment_solver").joinpath("examples/round.json").is_file()


def test_flower_and_nvflare_plugins_load_in_one_process():
    """Both framework extras share one environment (protobuf 6.x, as flwr needs)."""
    pytest.importorskip("flwr")
    pytest.importorskip("nvflare")
    code = """
import google.protobuf
import alignment_solver.integrations.flower as fl
import alignment_solver.integrations.nvflare as nv
from nvflare.app_common.abstract.fl_model import FLModel
assert fl.ReplyChecker is nv.ReplyChecker and fl.aggregate is nv.aggregate
print(google.protobuf.__version__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("6."), proc.stderr[-2000:]
