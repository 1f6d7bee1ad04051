"""Why a problem is infeasible, in words, with the offending client and expert ids.

``quick_reasons`` runs numpy checks that need no solver (a client allowed fewer experts than its
minimum, an expert that all its possible clients together cannot load enough, totals that
cannot meet).  ``flow_cut_reason`` decides count-load problems exactly: feasibility of the
circulation with lower bounds is a max-flow, and a minimum cut names a set that breaks
Hoffman's condition (lower bounds into the set exceed capacity out of it), which reads as
"these experts need N clients, but only M client slots can reach them" or the client-side twin.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .formulations.flow import count_band
from .problem import AlignmentProblem


def _ids(problem: AlignmentProblem, idx: Sequence[int], kind: str, limit: int = 12) -> str:
    label = problem.client_label if kind == "client" else problem.expert_label
    names = [label(int(i)) for i in idx[:limit]]
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"{names}{more}"


def client_reasons(problem: AlignmentProblem) -> list[str]:
    """Client-side impossibilities, which no soft band can fix."""
    out = []
    low = problem.min_experts_array
    allowed = problem.allowed_matrix
    n_allowed = allowed.sum(axis=1)
    bad = np.flatnonzero(low > n_allowed)
    if len(bad):
        out.append(f"clients {_ids(problem, bad, 'client')} must train at least "
                   f"{low[bad].tolist()[:12]} experts but are allowed only {n_allowed[bad].tolist()[:12]}")
    if problem.has_groups:
        reach = np.zeros((problem.n_clients, problem.n_groups), dtype=np.int64)
        ci, ei = np.nonzero(allowed)
        np.add.at(reach, (ci, problem.group_array[ei]), 1)
        glo, gk = problem.group_min_matrix, problem.group_capacity_matrix
        short = np.argwhere(glo > reach)
        if len(short):
            out.append(f"clients {_ids(problem, short[:, 0], 'client')} must train at least "
                       f"{glo[short[:, 0], short[:, 1]].tolist()[:12]} experts of groups {short[:12, 1].tolist()} "
                       f"but are allowed only {reach[short[:, 0], short[:, 1]].tolist()[:12]} there")
        top = np.minimum(gk, reach).sum(axis=1)
        low_total = glo.sum(axis=1)
        over = np.flatnonzero(low_total > problem.capacity_array)
        if len(over):
            out.append(f"clients {_ids(problem, over, 'client')} must train at least {low_total[over].tolist()[:12]} "
                       f"experts over their groups but their capacity is {problem.capacity_array[over].tolist()[:12]}")
        under = np.flatnonzero(top < low)
        if len(under):
            out.append(f"clients {_ids(problem, under, 'client')} must train at least {low[under].tolist()[:12]} "
                       f"experts but their group capacities allow only {top[under].tolist()[:12]}")
    if problem.has_min_group:
        from .search.floor import forced

        _, off = forced(problem, soft=True)
        if off.any():
            usable = (allowed & ~off[None, :]).sum(axis=1)
            stuck = np.flatnonzero((low > usable) & (low <= n_allowed))
            if len(stuck):
                out.append(f"clients {_ids(problem, stuck, 'client')} must train at least {low[stuck].tolist()[:12]} "
                           f"experts but only {usable[stuck].tolist()[:12]} of the experts they may train can reach "
                           f"their privacy floor (experts {_ids(problem, np.flatnonzero(off), 'expert')} cannot)")
    if problem.has_budget:
        usage = problem.usage_matrix if problem.allowed is None else np.where(allowed, problem.usage_matrix, np.inf)
        m = int(low.max(initial=0))
        if m == 0:
            need = np.zeros(problem.n_clients)
        else:
            cheapest = np.sort(np.partition(usage, m - 1, axis=1)[:, :m], axis=1) if m < problem.n_experts \
                else np.sort(usage, axis=1)
            ranks = np.arange(cheapest.shape[1])[None, :] < low[:, None]
            need = np.where(ranks, cheapest, 0.0).sum(axis=1)
        poor = np.flatnonzero((need > problem.budget + 1e-9) & (low <= n_allowed))
        if len(poor):
            out.append(f"clients {_ids(problem, poor, 'client')} cannot fit min_experts within their budget: "
                       f"the cheapest allowed experts need {need[poor].tolist()[:12]} > budget "
                       f"{problem.budget[poor].tolist()[:12]}")
    return out


def quick_reasons(problem: AlignmentProblem) -> list[str]:
    """Every impossibility found by simple counting; empty does not prove feasibility."""
    out = client_reasons(problem)
    allowed = problem.allowed_matrix & (problem.capacity_array > 0)[:, None]
    w = problem.weight_matrix
    reach = allowed.sum(axis=0).astype(float) if w is None else np.where(allowed, w, 0.0).sum(axis=0)
    L = problem.min_load_array
    short = np.flatnonzero(L > reach + 1e-9)
    if len(short):
        unit = "clients" if w is None else "load"
        out.append(f"experts {_ids(problem, short, 'expert')} need at least {L[short].tolist()[:12]} {unit} but "
                   f"the clients that may take them bring at most {reach[short].tolist()[:12]}")
    if problem.has_min_group:
        from .search.floor import forced

        on, off = forced(problem)
        m = problem.min_group_array
        both = np.flatnonzero(on & off)
        if len(both):
            cap = np.minimum(problem.allowed_matrix.sum(axis=0), np.floor(problem.max_load_array + 1e-9))
            out.append(f"experts {_ids(problem, both, 'expert')} must be trained (expert_min_load > 0), so by at least "
                       f"{m[both].tolist()[:12]} clients (expert_min_group), but at most {cap[both].astype(int).tolist()[:12]} "
                       f"clients may train them")
    if w is None:
        k_eff = np.minimum(problem.capacity_array, problem.allowed_matrix.sum(axis=1))
        U = np.minimum(problem.max_load_array, problem.allowed_matrix.sum(axis=0))
        if np.ceil(L - 1e-9).sum() > k_eff.sum():
            out.append(f"experts need at least {int(np.ceil(L - 1e-9).sum())} client slots in total but clients "
                       f"offer at most {int(k_eff.sum())}")
        if problem.min_experts_array.sum() > np.floor(U + 1e-9).sum():
            out.append(f"clients must train at least {int(problem.min_experts_array.sum())} experts in total but "
                       f"experts accept at most {int(np.floor(U + 1e-9).sum())}")
    return out


def flow_cut_reason(problem: AlignmentProblem) -> Optional[str]:
    """Exact feasibility check for count-load problems; None when feasible."""
    from ortools.graph.python import max_flow

    C, E = problem.fitness.shape
    allowed = problem.allowed_matrix
    lo = problem.min_experts_array.astype(np.int64)
    k = np.minimum(problem.capacity_array, allowed.sum(axis=1)).astype(np.int64)
    if np.any(lo > k):
        return None  # reported by client_reasons
    L, U = count_band(problem)
    S, T, src, snk = C + E, C + E + 1, C + E + 2, C + E + 3
    ci, ei = np.nonzero(allowed)
    excess = np.zeros(C + E + 2, np.int64)
    excess[:C] += lo
    excess[S] -= lo.sum()
    excess[C:C + E] -= L
    excess[T] += L.sum()
    pos, neg = np.flatnonzero(excess > 0), np.flatnonzero(excess < 0)
    big = int(k.sum()) + int(L.sum()) + 1
    tails = np.concatenate([np.full(C, S), ci, np.arange(C, C + E), [T], np.full(len(pos), src), neg])
    heads = np.concatenate([np.arange(C), ei + C, np.full(E, T), [S], pos, np.full(len(neg), snk)])
    caps = np.concatenate([k - lo, np.ones(len(ci), np.int64), np.maximum(U - L, 0), [big],
                           excess[pos], -excess[neg]])
    mf = max_flow.SimpleMaxFlow()
    mf.add_arcs_with_capacity(tails.astype(np.int64), heads.astype(np.int64), caps.astype(np.int64))
    if mf.solve(src, snk) != mf.OPTIMAL:
        return "the feasibility max-flow did not finish"
    need = int(excess[pos].sum())
    if mf.optimal_flow() >= need:
        return None
    side = np.zeros(C + E + 4, dtype=bool)
    side[np.asarray(mf.get_source_side_min_cut(), dtype=np.int64)] = True
    in_x_client, in_x_expert = side[:C], side[C:C + E]
    if side[S] and side[T]:
        experts = np.flatnonzero(~in_x_expert & (L > 0))
        clients = ~in_x_client
        slots = int(k[clients].sum()) + int(allowed[~clients][:, experts].sum())
        return (f"experts {_ids(problem, experts, 'expert')} need at least {int(L[experts].sum())} clients in total "
                f"but only {slots} client slots can reach them")
    clients = np.flatnonzero(in_x_client & (lo > 0))
    experts = in_x_expert
    slots = int(U[experts].sum()) + int(allowed[clients][:, ~experts].sum())
    return (f"clients {_ids(problem, clients, 'client')} must train at least {int(lo[clients].sum())} experts in "
            f"total but only {slots} expert slots are open to them")


def explain(problem: AlignmentProblem, *, soft: bool = False) -> Optional[str]:
    """An explanation of infeasibility, or None if none was found (or the problem is feasible)."""
    reasons = client_reasons(problem) if soft else quick_reasons(problem)
    if not reasons and not soft and problem.is_flow:
        cut = flow_cut_reason(problem)
        if cut:
            reasons.append(cut)
    if not reasons and problem.has_min_group:
        floors = np.flatnonzero(problem.min_group_array > 1)
        reasons.append(f"no choice of which experts to train gives each of {_ids(problem, floors, 'expert')} either no "
                       f"client or at least its expert_min_group {problem.min_group_array[floors].tolist()[:12]} while "
                       f"every other constraint holds")
    return "; ".join(reasons) if reasons else None
