"""Time of ``AlignmentProblem(...)`` at 100,000 x 128 against the numpy floor (issue 38).

The floor is what any validating constructor must do: copy the arrays the problem keeps
(fitness, previous, the per-client and per-expert vectors) and one finiteness pass over the
fitness (``np.isfinite(f).all()``).  ``before`` is ``alignment_solver/problem.py`` as committed
(``git show HEAD:...``, or ``--before FILE``), ``after`` the working tree; before, after and
the floor run interleaved in one process, ``--repeats`` times each.  Cases: the coordinator's
round (fitness, capacity, min_experts, band vectors, previous with a switch penalty, 100,000
integer client ids) and a bare one (fitness and capacity).

    python benchmarks/problem_build.py [--repeats 7] [--clients 100000] [--experts 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown, publish  # noqa: E402

from alignment_solver.problem import AlignmentProblem  # noqa: E402


def load_before(path: str | None):
    if path is None:
        text = subprocess.run(["git", "show", "HEAD:alignment_solver/problem.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        tmp = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        tmp.write(text)
        tmp.close()
        path = tmp.name
    spec = importlib.util.spec_from_file_location("alignment_solver._problem_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                # pydantic resolves the annotations through it
    spec.loader.exec_module(module)
    return module.AlignmentProblem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--before", default=None, help="problem.py to compare with (default: git HEAD's)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "problem_build.md"))
    args = parser.parse_args()
    Before = load_before(args.before)
    C, E = args.clients, args.experts
    rng = np.random.default_rng(0)
    fitness = rng.random((C, E))
    cap = rng.integers(1, 4, C)
    low = np.minimum(1, cap)
    previous = rng.random((C, E)) < 0.02
    fair = cap.sum() / E
    lo, hi = np.full(E, np.floor(0.9 * fair)), np.full(E, np.ceil(1.1 * fair))
    ids = list(range(C))
    cases = {
        "coordinator round": (dict(fitness=fitness, capacity=cap, min_experts=low, expert_min_load=lo,
                                   expert_max_load=hi, previous=previous, switch_penalty=0.02, client_ids=ids),
                              (fitness, cap, low, lo, hi, previous)),
        "fitness + capacity": (dict(fitness=fitness, capacity=cap), (fitness, cap)),
    }

    def floor(arrays):
        kept = [np.array(a, copy=True) for a in arrays]
        return bool(np.isfinite(kept[0]).all())

    rows = []
    for name, (fields, arrays) in cases.items():
        times = {"before": [], "after": [], "floor": []}
        for i in range(args.repeats):
            order = [("before", Before, fields), ("after", AlignmentProblem, fields), ("floor", floor, arrays)]
            for kind, fn, arg in order[i % 3:] + order[:i % 3]:       # rotate who goes first
                t = time.perf_counter()
                fn(**arg) if isinstance(arg, dict) else fn(arg)
                times[kind].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append([name, round(1000 * med["before"], 1), f"{1000 * min(times['before']):.0f}-{1000 * max(times['before']):.0f}",
                     round(1000 * med["after"], 1), f"{1000 * min(times['after']):.0f}-{1000 * max(times['after']):.0f}",
                     round(1000 * med["floor"], 1), f"{1000 * min(times['floor']):.0f}-{1000 * max(times['floor']):.0f}",
                     round(med["before"] / med["floor"], 1), round(med["after"] / med["floor"], 1),
                     "met" if med["after"] <= 2 * med["floor"] else f"missed ({med['after'] / med['floor'] / 2:.1f}x)"])
    head = ["case", "before ms (median)", "before min-max", "after ms (median)", "after min-max", "floor ms (median)",
            "floor min-max", "before / floor", "after / floor", "target after <= 2x floor"]
    command = f"python benchmarks/problem_build.py --repeats {args.repeats} --clients {C} --experts {E}"
    text = (f"# Problem construction at {C:,} x {E}\n\nMachine: {machine()}. {args.note}\nCommand: `{command}`.\n\n"
            f"Floor: copying the arrays the problem keeps plus one `np.isfinite(fitness).all()`; before (git HEAD's "
            f"problem.py), after (this tree) and the floor interleaved, {args.repeats} repeats each, first "
            f"position rotated.\n\n{markdown(head, rows)}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
