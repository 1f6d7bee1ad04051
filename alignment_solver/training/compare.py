"""Strategies over several seeds, paired: means, paired differences with 95 % t intervals, a verdict.

Every strategy of a seed runs on the same world and the same random draws (common random numbers,
:class:`~.world.World`), so the difference between two strategies on one seed is a paired
observation; the interval is Student's t over the seeds.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from ..progress import Progress
from .config import SimConfig

#: Student's t, two-sided 95 %, by degrees of freedom (1.96 beyond).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 20: 2.086, 29: 2.045, 30: 2.042}


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences (NaN ends with fewer than 2)."""
    n = len(diffs)
    m = statistics.mean(diffs)
    if n < 2:
        return m, math.nan, math.nan
    t = 1.96 if n - 1 > max(T95) else T95[max(d for d in T95 if d <= n - 1)]     # conservative between rows
    h = t * statistics.stdev(diffs) / math.sqrt(n)
    return m, m - h, m + h


def compare(cfg: SimConfig, *, write: bool = True, show_progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on seeds ``cfg.seed .. cfg.seed + cfg.seeds - 1``, each in its own run folder (a
    ``name`` gains ``-seed{s}``).  Per strategy: the mean final accuracy, MB moved and simulated
    seconds, how many seeds reached the target, and against the first strategy the paired
    ``points_behind_<first>`` (first - it, accuracy points: mean and 95 % interval) and
    ``mb_share`` (the first's MB over its MB)."""
    from .simulate import simulate

    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    progress = Progress(cfg.rounds * len(cfg.strategies) * len(seeds)) if show_progress else None
    runs = []
    for s in seeds:
        one = cfg.model_copy(update={"seed": s, "seeds": 1, "name": cfg.name and f"{cfg.name}-seed{s}"})
        runs.append(simulate(one, write=write, show_progress=False, progress=progress))
    if progress:
        progress.close()
    ref = cfg.strategies[0]
    per: dict[str, dict[str, Any]] = {}
    for name in cfg.strategies:
        sums = [run["summary"][name] for run in runs]
        reached = [v["seconds_to_target"] for v in sums if v["seconds_to_target"] is not None]
        per[name] = {"accuracy": statistics.mean(v["final_accuracy"] for v in sums),
                     "mb_moved": statistics.mean(v["mb_moved"] for v in sums),
                     "sim_seconds": statistics.mean(v["sim_seconds"] for v in sums),
                     "reached": len(reached),
                     "seconds_to_target": statistics.mean(reached) if reached else None}
        if name != ref:
            acc = [100 * (r["summary"][ref]["final_accuracy"] - r["summary"][name]["final_accuracy"]) for r in runs]
            per[name]["points_behind_" + ref] = interval(acc)
            per[name]["mb_share"] = per[ref]["mb_moved"] / per[name]["mb_moved"] if per[name]["mb_moved"] else math.inf
    return {"seeds": seeds, "reference": ref, "strategies": per, "runs": runs}


def comparison_table(cfg: SimConfig, out: dict[str, Any]) -> str:
    ref, goal, n = out["reference"], format(cfg.target_accuracy, ".0%"), len(out["seeds"])
    head = (f"{'strategy':16}{'accuracy':>10}{f'{ref} - this, points [95% CI]':>36}{'MB moved':>10}"
            f"{'seeds to ' + goal:>14}{'sim s to ' + goal:>14}")
    lines = [head, "-" * len(head)]
    for name, v in out["strategies"].items():
        gap = v.get("points_behind_" + ref)
        gap_text = "-" if gap is None else _signed(gap)
        secs = "-" if v["seconds_to_target"] is None else f"{v['seconds_to_target']:.0f}"
        reached = f"{v['reached']}/{n}"
        lines.append(f"{name:16}{v['accuracy']:>10.3f}{gap_text:>36}{v['mb_moved']:>10.2f}{reached:>14}{secs:>14}")
    return "\n".join(lines)


def verdict(out: dict[str, Any]) -> str:
    """One sentence on what the comparison table means."""
    ref, n, parts = out["reference"], len(out["seeds"]), []
    for name, v in out["strategies"].items():
        gap: Optional[tuple[float, float, float]] = v.get("points_behind_" + ref)
        if gap is None:
            continue
        m, lo, hi = gap
        if math.isnan(lo):
            how = f"{abs(m):.1f} points {'above' if m > 0 else 'below'} {name} (one seed: no interval)"
        elif lo > 0:
            how = f"ahead of {name} by {m:.1f} points (interval above 0)"
        elif hi < 0:
            how = f"behind {name} by {-m:.1f} points (interval below 0)"
        else:
            how = f"within noise of {name} ({m:+.1f} points, interval spans 0)"
        parts.append(f"{how}, moving {v['mb_share']:.2f}x its MB")
    if not parts:
        return f"Over {n} seeds only {ref} ran: there is nothing to compare it with."
    return f"Over {n} paired seeds, {ref} is " + "; ".join(parts) + "."


def _signed(gap: tuple[float, float, float]) -> str:
    m, lo, hi = gap
    return f"{m:+.1f}" if math.isnan(lo) else f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"
