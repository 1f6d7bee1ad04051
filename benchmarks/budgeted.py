"""Budgeted and weighted rounds at every size: how good is the plan after 0.5 s and after 2 s?

For each size (100 x 8, 1,000 x 32, 2,000 x 32, 5,000 x 64, 10,000 x 64), kind (budget rows;
weighted loads) and mode (hard band; soft band), ``solve(backend="auto", time_limit=T)`` runs
in a fresh process for T = 0.5 and 2 s.  Each plan is compared with the LP relaxation's optimum (scipy's HiGHS), an
upper bound on any plan; ``gap = (best bound - objective) / |best bound|`` with the smaller of the
LP bound and the bound ``solve`` reports; the gap to the LP bound alone and, for budgeted rounds
up to 2,000 clients, to CBC's proven optimum are printed beside it.  Targets from issue 9: a
plan within 0.5 s, and within 1 % of the bound within 2 s; either way ``solve`` returns within
its time limit + 0.5 s.

Then the large budgeted round, 100,000 x 128 (seeds 0, 1, 2; hard and soft band) at 10 s,
against the bound ``solve`` reports (the LP is out of reach there: scipy's HiGHS held 12 GB
and had not finished after 5 minutes when it was stopped).  Target: within 2 % in 10 s (wall <= 10.5 s) and
at most 4 GB peak memory (the solving process and its workers).

    python benchmarks/budgeted.py [--out benchmarks/results/budgeted.md] [--large-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, isolated, machine, markdown, publish  # noqa: E402

SIZES = [(100, 8), (1_000, 32), (2_000, 32), (5_000, 64), (10_000, 64)]
KINDS = ["budget", "weighted"]
LIMITS = [0.5, 2.0]
OPTIMUM_LIMIT = 60          # seconds CBC gets to prove the optimum of budgeted rounds up to OPTIMUM_CLIENTS
OPTIMUM_CLIENTS = 2_000
LARGE = (100_000, 128)
LARGE_SEEDS = [0, 1, 2]
LARGE_LIMIT = 10.0
LARGE_MB = 4096


def make(clients: int, experts: int, kind: str, seed: int = 0):
    import numpy as np

    from alignment_solver import AlignmentProblem
    from alignment_solver.instances import random_problem

    if kind == "weighted":
        base = random_problem(clients, experts, seed=0)
        w = np.random.default_rng(1).uniform(0.5, 2.0, clients)
        return AlignmentProblem.balanced(base.fitness, base.capacity, tolerance=0.1, load_weight=w, min_experts=1)
    return random_problem(clients, experts, seed=seed, budget=True)


def lp_bound(clients: int, experts: int, kind: str, soft: bool) -> dict:
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import vstack

    from alignment_solver.formulations.milp import LinearModel
    from alignment_solver.solve import default_soft_penalty

    problem = make(clients, experts, kind)
    lm = LinearModel.from_problem(problem, default_soft_penalty(problem) if soft else None)
    c, A, lo, hi, var_hi, _ = lm.matrices()
    fh, fl = np.isfinite(hi), np.isfinite(lo)
    res = linprog(-c, A_ub=vstack([A[fh], -A[fl]]), b_ub=np.r_[hi[fh], -lo[fl]],
                  bounds=list(zip(np.zeros(len(c)), var_hi)), method="highs")
    return {"bound": -res.fun if res.status == 0 else None}


def optimum(clients: int, experts: int, kind: str, soft: bool) -> dict:
    """CBC without a time limit but ``OPTIMUM_LIMIT``: the proven optimum, or None."""
    from alignment_solver import solve

    r = solve(make(clients, experts, kind), backend="pulp_cbc", soft=soft, time_limit=OPTIMUM_LIMIT)
    return {"optimum": r.objective if r.status.value == "optimal" else None, "seconds": r.solve_seconds}


def one(clients: int, experts: int, kind: str, soft: bool, limit: float, seed: int = 0) -> dict:
    from alignment_solver import solve

    problem = make(clients, experts, kind, seed)
    started = time.perf_counter()
    r = solve(problem, time_limit=limit, soft=soft)
    warm = r.stats.get("warm_start", {}).get("kind")
    return {"wall": time.perf_counter() - started, "status": r.status.value, "backend": r.backend,
            "objective": r.objective, "bound": r.bound,
            "source": r.stats.get("source", "solver") + (f" ({warm} warm start)" if warm else "")}


def large(progress: Progress) -> str:
    """The 100,000 x 128 budgeted rounds at ``LARGE_LIMIT`` seconds, as a markdown section."""
    rows = []
    for seed in LARGE_SEEDS:
        for soft in (False, True):
            progress.step(f"{LARGE[0]}x{LARGE[1]} budget seed {seed} {'soft' if soft else 'hard'} {LARGE_LIMIT:g}s")
            out = isolated(one, *LARGE, "budget", soft, LARGE_LIMIT, seed, timeout=LARGE_LIMIT + 300)
            obj, bound, mb = out.get("objective"), out.get("bound"), out.get("peak_mb")
            gap = None if obj is None or bound is None else 100 * (bound - obj) / max(abs(bound), 1e-12)
            ok = (out.get("wall") is not None and out["wall"] <= LARGE_LIMIT + 0.5 and gap is not None and gap <= 2
                  and mb is not None and mb <= LARGE_MB)
            rows.append([seed, "soft" if soft else "hard", out.get("wall"), out.get("status", out.get("error")),
                         out.get("source"), obj, bound, gap, mb, "yes" if ok else "NO"])
    met = sum(r[-1] == "yes" for r in rows)
    return "\n".join([
        f"## Budgeted {LARGE[0]:,} x {LARGE[1]} at {LARGE_LIMIT:g} s", "",
        f"`random_problem({LARGE[0]}, {LARGE[1]}, seed=s, budget=True)`, `solve(time_limit={LARGE_LIMIT:g})`, each run in a "
        "fresh process.  `gap %` against the bound `solve` reports (band prices over exact client knapsacks; "
        "never above the LP bound; scipy's HiGHS held 12 GB and had not finished after 5 minutes when it was stopped).  `peak MB`: "
        f"the solving process and its workers.  Target: gap <= 2 %, wall <= {LARGE_LIMIT + 0.5:g} s, peak <= {LARGE_MB} MB.", "",
        markdown(["seed", "band", "wall s", "status", "source", "objective", "solver bound", "gap %", "peak MB",
                  "target met"], rows), "",
        f"Target met in {met} of {len(rows)} runs.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/budgeted.md")
    ap.add_argument("--large-only", action="store_true", help="only the 100,000 x 128 section (prints it; --out untouched)")
    args = ap.parse_args()
    if args.large_only:
        progress = Progress(len(LARGE_SEEDS) * 2)
        text = large(progress)
        progress.close()
        print(text)
        return
    rows = []
    small = sum(C <= OPTIMUM_CLIENTS for C, _ in SIZES)
    progress = Progress(len(SIZES) * len(KINDS) * 2 * (len(LIMITS) + 1) + small * 2 + len(LARGE_SEEDS) * 2)
    for C, E in SIZES:
        for kind in KINDS:
            for soft in (False, True):
                progress.step(f"LP {C}x{E} {kind}")
                lp = isolated(lp_bound, C, E, kind, soft, timeout=600).get("bound")
                opt = None
                if kind == "budget" and C <= OPTIMUM_CLIENTS:
                    progress.step(f"optimum {C}x{E} {kind}")
                    opt = isolated(optimum, C, E, kind, soft, timeout=OPTIMUM_LIMIT + 300).get("optimum")
                for limit in LIMITS:
                    progress.step(f"{C}x{E} {kind} {'soft' if soft else 'hard'} {limit:g}s")
                    out = isolated(one, C, E, kind, soft, limit, timeout=limit + 300)
                    obj = out.get("objective")
                    best = min([b for b in (lp, out.get("bound")) if b is not None], default=None)
                    gap = None if obj is None or best is None else (best - obj) / max(abs(best), 1e-12)
                    proven_none = out.get("status") == "infeasible" and lp is None
                    in_time = out.get("wall") is not None and out["wall"] <= limit + 0.5
                    ok = in_time and (proven_none or (obj is not None and (limit < 1 or (gap is not None and gap <= 0.01))))
                    lp_gap = None if obj is None or lp is None else 100 * (lp - obj) / max(abs(lp), 1e-12)
                    opt_gap = None if obj is None or opt is None else 100 * (opt - obj) / max(abs(opt), 1e-12)
                    rows.append([f"{C:,} x {E}", kind, "soft" if soft else "hard", limit, out.get("wall"),
                                 out.get("status", out.get("error")), out.get("source"), obj, lp, out.get("bound"),
                                 None if gap is None else 100 * gap, lp_gap, opt, opt_gap, "yes" if ok else "NO"])
    section = large(progress)
    progress.close()
    met = sum(r[-1] == "yes" for r in rows)
    quick = [r for r in rows if r[3] < 1 and r[7] is not None]
    strict = sum(r[4] <= r[3] for r in quick)
    lp_far = [r for r in rows if r[3] >= 1 and r[5] != "optimal" and r[11] is not None and r[11] > 1]
    late = "; ".join(f"{r[0]} {r[1]} {r[2]}: {r[4]:.2f} s" for r in quick if r[4] > r[3])
    text = "\n".join([
        "# Budgeted and weighted rounds: plan quality under a time limit", "",
        f"Machine: {machine()}.  Command: `python benchmarks/budgeted.py`.  Instances: "
        "`alignment_solver.instances.random_problem(C, E, seed=0, budget=True)` (budget) and the same fitness "
        "with load weights U(0.5, 2) and a +-10 % band (weighted); `solve(backend='auto', time_limit=T)`, "
        "each run in a fresh process.  `LP bound`: the LP relaxation (scipy HiGHS), an upper bound on any plan.  "
        "`solver bound`: the bound `solve` reports (valid: CP-SAT's proof or a Lagrangian bound; on budgeted "
        "rounds the band-price bound over exact client knapsacks, which can be well below the LP's).  "
        "`gap %` = (best bound - objective) / |best bound|, best bound = the smaller of the two; `LP gap %` the same "
        "against the LP bound alone.  `optimum`: budgeted rounds up to "
        f"{OPTIMUM_CLIENTS:,} clients, `pulp_cbc` with a {OPTIMUM_LIMIT} s limit, shown only when proven OPTIMAL; "
        "`opt gap %` = (optimum - objective) / |optimum|.  "
        "Target: a plan at 0.5 s; within 1 % of the best bound at 2 s; wall <= limit + 0.5 s; a proven INFEASIBLE (the LP is "
        "infeasible too) is the right answer and counts as met.  `source`: who found the plan.", "",
        markdown(["size", "kind", "band", "limit s", "wall s", "status", "source", "objective", "LP bound",
                  "solver bound", "gap %", "LP gap %", "optimum", "opt gap %", "target met"], rows), "",
        f"Target met in {met} of {len(rows)} runs.", "",
        f"Stricter reading (the plan itself returned within 0.5 s wall, not 0.5 s + 0.5 s): {strict} of {len(quick)} "
        f"0.5 s runs with a plan" + (f"; later: {late}." if late else "."), "",
        f"Against the LP bound alone, {len(lp_far)} of the 2 s runs without a proof of optimality are more than 1 % away"
        + (": " + "; ".join(f"{r[0]} {r[1]} {r[2]} {r[11]:.2f} %" + (f" (the optimum itself is {100 * (r[8] - r[12]) / abs(r[8]):.2f} % "
                            "below the LP)" if r[12] is not None else "") for r in lp_far) + "." if lp_far else "."), "",
        section])
    publish(text, args.out)


if __name__ == "__main__":
    main()
