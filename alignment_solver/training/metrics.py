"""Per-round metrics of the simulation and their summary table."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .config import SimConfig
from .data import Dataset
from .model import MoE, Params


def routing_nmi(model: MoE, params: Params, data: Dataset, trained: np.ndarray) -> float:
    """Normalised mutual information between each training sample's top expert under the global
    gate (among trained experts) and its true domain; NaN without domains."""
    if data.domain_train is None or not trained.any():
        return math.nan
    logits = np.where(trained[None, :], data.x_train @ params["gate.W"] + params["gate.b"], -np.inf)
    return nmi(data.domain_train, logits.argmax(axis=1))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information ``I(a; b) / mean(H(a), H(b))`` of two labelings (1 if both constant)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    entropy = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())  # noqa: E731
    ha, hb = entropy(pa), entropy(pb)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return 1.0 if ha == hb == 0 else max(0.0, mi / ((ha + hb) / 2))


def fallback(plan) -> bool:
    """Whether the coordinator's solver found no plan and the greedy fallback planned the round."""
    r = plan.result
    return "greedy fallback" in (plan.explanation or "") or (r is not None and r.stats.get("source") == "greedy fallback")


def reach(rows: list[dict], target: float, key: str = "accuracy") -> Optional[dict]:
    """The first row whose ``key`` reaches ``target``, with the bytes moved up to it (None: never)."""
    moved = 0
    for r in rows:
        moved += r["bytes_down"] + r["bytes_up"]
        if r[key] >= target:
            return {**r, "mb_to_target": moved / 1e6}
    return None


def summarise(cfg: SimConfig, rows: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        hit = reach(mine, cfg.target_accuracy)
        out[s] = {"final_accuracy": mine[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in mine),
                  "final_personalised_accuracy": mine[-1]["personalised_accuracy"],
                  "rounds_to_target": hit["round"] + 1 if hit else None,
                  "seconds_to_target": hit["sim_seconds"] if hit else None,
                  "mb_to_target": hit["mb_to_target"] if hit else None,
                  "sim_seconds": mine[-1]["sim_seconds"], "final_nmi": mine[-1]["nmi"],
                  "untrained_experts": mine[-1]["untrained"],
                  "mean_load_cv": float(np.mean([r["load_cv"] for r in mine])),
                  "solve_ms_per_round": float(np.mean([r["solve_ms"] for r in mine])),
                  "fallback_rounds": int(sum(r["fallback"] for r in mine)),
                  "mb_moved": sum(r["bytes_down"] + r["bytes_up"] for r in mine) / 1e6}
    return out


def table(cfg: SimConfig, summary: dict[str, dict[str, Any]]) -> str:
    goal = format(cfg.target_accuracy, ".0%")
    head = (f"{'strategy':16}{'global acc':>11}{'personal acc':>13}{'rounds to ' + goal:>16}{'sim s to ' + goal:>15}"
            f"{'MB moved':>10}{'load CV':>9}{'solve ms':>10}")
    lines = [head, "-" * len(head)]
    for s, v in summary.items():
        rounds = v["rounds_to_target"] if v["rounds_to_target"] is not None else "-"
        secs = format(v["seconds_to_target"], ".0f") if v["seconds_to_target"] is not None else "-"
        lines.append(f"{s:16}{v['final_accuracy']:>11.3f}{v['final_personalised_accuracy']:>13.3f}{rounds!s:>16}"
                     f"{secs:>15}{v['mb_moved']:>10.2f}{v['mean_load_cv']:>9.3f}{v['solve_ms_per_round']:>10.1f}")
    return "\n".join(lines)
