"""The round coordinator: fitness scoring + load monitoring + capacity profiling -> one solve.

A training loop or a federated-learning framework drives it with two calls per round::

    plan = coord.plan_round(r, available_clients)      # who trains which experts
    ...train...
    summary = coord.observe_round(r, reports)           # learn from what happened

``plan_round`` builds the :class:`AlignmentProblem` from the three components (fitness with
exploration, capacity and budget from the profiler, the load band from the monitor, last
round's holdings with ``switch_penalty``), solves it and remembers the plan.  ``observe_round``
checks every report against that plan before changing anything (a bad report raises
:class:`ReportError` and leaves the state as it was), then updates all three components;
planned clients that sent nothing are dropouts.  The same history and seed give the same plans.

Rounds strictly increase: ``plan_round(r)`` needs ``r`` above the last observed round, and while
a plan is pending (planned, not yet observed) a new plan replaces it only with ``replan=True``;
``observe_round`` takes the pending round only.  Anything else raises :class:`RoundError`.

``save``/``load`` keep the whole state in one JSON file, written atomically; ``load`` checks every
field first (:class:`StateError` names the one that is wrong).  ``session(path)`` holds the
file's exclusive lock across load -> modify -> save, so processes sharing one state file
serialise instead of losing updates.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .capacity import CapacityConfig, CapacityProfiler
from .errors import ReportError, RoundError, StateError, read_text
from .load_monitor import ExpertLoadMonitor, MonitorConfig, cv
from .problem import MAX_COUNT, MAX_ROUND, AlignmentProblem
from .result import AlignmentResult, SolveStatus
from .rounds import ClientReport, ClientStatus, Label, NonNegative, PlannedClient, RoundPlan, RoundSummary
from .scoring import FitnessScorer, ScorerConfig
from .solve import solve
from .state import MAX_EXPERTS, STATE_VERSION, check_state, generation_on_disk, locked, write_atomic
_REPORTS = TypeAdapter(list[ClientReport])
TIE_STREAM = 1     # spawn key of the tie-breaking draws


FLOOR_SOFT_LIMIT = 10.0    # seconds for a priced band under a privacy floor when no time_limit is set


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    scorer: ScorerConfig = ScorerConfig()
    monitor: MonitorConfig = MonitorConfig()
    capacity: CapacityConfig = CapacityConfig()
    tolerance: float = Field(0.1, ge=0, le=1e6, description="load band half-width around the fair share")
    switch_penalty: float = Field(0.02, ge=0, description="fitness cost of sending a client a new expert")
    min_experts: int = Field(1, ge=0, description="fewest experts a client with capacity trains")
    soft: bool = Field(True, description="penalised load band, so a round can always go ahead")
    backend: str = "auto"
    time_limit: Optional[float] = Field(None, gt=0, le=1e7)
    seed: int = Field(0, ge=0, le=2 ** 30, description="solve seed of round r is seed + r")
    tie_break: float = Field(1e-9, ge=0, le=1e-3, description=(
        "fitness ties are broken at random: each pair's fitness gains U(0, tie_break) drawn from a stream "
        "of (seed, round) of its own, in the order the clients are given; 0: ties go to the solver"))
    deadline: Optional[float] = Field(None, gt=0, le=MAX_COUNT, description="default round deadline in seconds")
    fallback: Literal["greedy", "none"] = Field(
        "greedy", description="when the solve finds nothing (e.g. its time limit), plan with the greedy backend")
    expert_memory: Optional[list[NonNegative]] = Field(None, description="(E,) memory of each expert: budget rows")
    expert_cost: float = Field(0.0, ge=0, le=1e6, description=(
        "fitness an expert must beat to be planned beyond min_experts; > 0 also sizes the load band to "
        "that demand, with lower end 0 (demand-sized plans; 0: fill capacity, every expert in the band)"))
    band: Literal["fair", "demand"] = Field("fair", description=(
        "load band: 'fair' around the fair share of the round's demand; 'demand' caps each expert at the "
        "demand shared among the experts that are some client's best (its top fitness), with lower end 0"))
    probes: int = Field(0, ge=0, le=MAX_EXPERTS, description=(
        "experts each planned client evaluates on held-out data without training (least measured first)"))
    min_group: int = Field(0, ge=0, le=MAX_COUNT, description=(
        "privacy floor: each expert is trained by no client or by at least this many (expert_min_group); 0 or 1: off"))
    over_provision: bool = Field(True, description=(
        "plan the floor at ceil(min_group / r), r the clients' mean share of planned experts they finished "
        "(the capacity profiler's completion rate), so the floor still holds after the usual dropouts"))
    warm_start: bool = Field(True, description=(
        "solve each round warm from the last round's result (node potentials as prices, plan as candidates): "
        "the same optimum, sooner; a coordinator restored from a state file starts cold, so at scale it may pick "
        "another of equally good plans (False: every plan as from a cold start)"))
    unit_groups: Optional[list[int]] = Field(None, description=(
        "(E,) MoE layer of each unit when units are per layer: a client that trains gets at least min_experts "
        "units of each layer and at most its capacity per layer (capacity counts experts per layer)"))


class AlignmentCoordinator:
    """Plans and observes rounds for ``num_experts`` experts (indices ``0..E-1``)."""

    def __init__(self, num_experts: int, *, config: Optional[CoordinatorConfig] = None) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) \
                or not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts must be an integer in [1, {MAX_EXPERTS}]; got {num_experts!r}")
        self.E = int(num_experts)
        self.config = config or CoordinatorConfig()
        if self.config.expert_memory is not None and len(self.config.expert_memory) != self.E:
            raise ValueError(f"config.expert_memory must have {self.E} entries; got {len(self.config.expert_memory)}")
        groups = self.config.unit_groups
        if groups is not None and (len(groups) != self.E or min(groups) < 0 or max(groups) >= self.E):
            raise ValueError(f"config.unit_groups must have {self.E} entries in [0, {self.E - 1}]; got {groups!r:.200}")
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.scorer = FitnessScorer(self.E, self.config.scorer)
        self.monitor = ExpertLoadMonitor(self.E, self.config.monitor)
        self.profiler = CapacityProfiler(self.config.capacity)
        self.client_ids: list[Label] = []
        self._rows: dict[Label, int] = {}
        self.held = np.zeros((0, self.E), dtype=bool)
        self.pending: Optional[dict[str, Any]] = None     # the last plan, until observed
        self.generation: Optional[int] = None             # of the state file this coordinator loaded or saved
        #: the last solve's result: the next round's warm start (not saved; a loaded coordinator starts cold)
        self.last_result: Optional[AlignmentResult] = None

    # ---- clients ------------------------------------------------------------------------------
    def _ensure(self, ids: Sequence[Label]) -> np.ndarray:
        for cid in ids:
            if cid not in self._rows:
                self._rows[cid] = len(self.client_ids)
                self.client_ids.append(cid)
        n = len(self.client_ids)
        self.scorer.grow(n)
        self.profiler.grow(n)
        if self.held.shape[0] < n:
            self.held = np.vstack([self.held, np.zeros((n - self.held.shape[0], self.E), dtype=bool)])
        return np.array([self._rows[c] for c in ids], dtype=np.int64)

    def _routing(self, row: int, routing: Optional[list[float]], field: str) -> None:
        if routing is None:
            return
        if len(routing) != self.E:
            raise ReportError(f"{field} must have {self.E} entries (one per expert); got {len(routing)}")
        self.scorer.set_prior(np.array([row]), np.array([routing], dtype=float))

    # ---- planning -----------------------------------------------------------------------------
    @property
    def last_round(self) -> int:
        """The last observed round (-1 before the first)."""
        return self.monitor.last_round

    def _check_order(self, round: int, replan: bool) -> None:
        if round <= self.monitor.last_round:
            raise RoundError(f"round must be above the last observed round {self.monitor.last_round} "
                             f"(rounds strictly increase); got {round}")
        if self.pending is not None and not replan:
            raise RoundError(f"round {self.pending['round']} is planned and not observed; observe it first, or "
                             f"re-plan explicitly (replan=True; CLI --replan) to replace its plan "
                             f"(got a plan for round {round})")
        if self.pending is not None and round < self.pending["round"]:
            raise RoundError(f"a re-plan must be for the pending round {self.pending['round']} or later; "
                             f"got {round}")

    def plan_round(self, round: int, clients: Iterable[Union[Label, ClientStatus, dict]], *,
                   deadline: Optional[float] = None, replan: bool = False,
                   assign: Optional[Callable[[AlignmentProblem], np.ndarray]] = None) -> RoundPlan:
        """Who trains which experts in round ``round``, among the ``clients`` available now.

        ``replan=True`` replaces a pending plan (its reports are then refused); without it a
        pending plan raises :class:`RoundError`.  ``assign`` replaces the solve with another rule
        (a baseline strategy): it receives the round's problem and returns a (C, E) bool
        assignment, reported as FEASIBLE.  Every input is checked before the state changes.
        """
        if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or not 0 <= round < MAX_ROUND:
            raise RoundError(f"round must be an integer in [0, 2**53); got {round!r}")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not np.isfinite(deadline) or not deadline > 0):
            raise ValueError(f"deadline must be None or a number of seconds > 0; got {deadline!r}")
        self._check_order(int(round), replan)
        statuses = [c if isinstance(c, ClientStatus) else
                    ClientStatus.model_validate(c) if isinstance(c, dict) else ClientStatus(client_id=c)
                    for c in clients]
        if deadline is not None and deadline > MAX_COUNT:
            raise ValueError(f"deadline must be at most {MAX_COUNT:g} seconds; got {deadline!r}")
        ids = [s.client_id for s in statuses]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"clients must be unique; {dup!r} appears more than once")
        for s in statuses:
            if s.routing is not None and len(s.routing) != self.E:
                raise ValueError(f"routing of client {s.client_id!r} must have {self.E} entries; got {len(s.routing)}")
        deadline = deadline if deadline is not None else self.config.deadline
        rows = self._ensure(ids)
        for s, row in zip(statuses, rows):
            self.profiler.report(int(row), memory=s.memory, throughput=s.throughput, bandwidth=s.bandwidth,
                                 samples=s.samples, max_experts=s.max_experts, configured=s.configured_experts)
            self._routing(int(row), s.routing, "routing")
        if not ids:
            plan = RoundPlan(round=round, clients=[], status="empty", deadline=deadline)
            self.pending = {"round": round, "deadline": deadline, "experts": {}}
            return plan
        problem = self.build_problem(round, rows, deadline)
        if assign is None:
            result = self._solve(problem, round)
            if result.has_solution:
                self.last_result = result
            if not result.has_solution and self.config.fallback == "greedy":
                first = result
                result = solve(problem, backend="greedy", seed=self.config.seed + round, soft=self.config.soft)
                result.solve_seconds += first.solve_seconds + first.build_seconds
                result.explanation = (f"{first.backend}: {first.status.value} ({first.explanation}); "
                                      f"planned with the greedy fallback")
        else:
            started = time.perf_counter()
            x = np.asarray(assign(problem), dtype=bool)
            if x.shape != problem.fitness.shape:
                raise ValueError(f"assign must return a {problem.fitness.shape} bool array; got shape {x.shape}")
            result = AlignmentResult(problem, SolveStatus.FEASIBLE, getattr(assign, "__name__", "custom"),
                                     assignment=x, solve_seconds=time.perf_counter() - started)
        x = result.assignment if result.has_solution else np.zeros(problem.fitness.shape, dtype=bool)
        held_rows, held_experts = np.nonzero(x)
        experts = [e.tolist() for e in np.split(held_experts, np.searchsorted(held_rows, np.arange(1, len(ids))))]
        probes = self._probes(rows, x, problem.fitness)
        plan = RoundPlan(
            round=round, status=result.status.value, backend=result.backend, objective=result.objective,
            gap=result.gap, solve_seconds=result.solve_seconds + result.build_seconds, deadline=deadline,
            clients=[PlannedClient(client_id=s.client_id, experts=e, capacity=int(k), probe=p, label=s.label)
                     for s, e, k, p in zip(statuses, experts, self._per_layer_capacity(problem), probes)],
            expert_min_load=problem.min_load_array.tolist(), expert_max_load=problem.max_load_array.tolist(),
            planned_load=x.sum(axis=0).astype(int).tolist(), planned_cv=cv(x.sum(axis=0)),
            min_group=int(problem.min_group_array.max()) if problem.has_min_group else None,
            explanation=result.explanation)
        plan._result = result
        self.pending = {"round": round, "deadline": deadline, "experts": {str(r): e for r, e in zip(rows, experts)}}
        if self.config.probes:
            self.pending["probes"] = {str(r): p for r, p in zip(rows, probes)}
        return plan

    def _probes(self, rows: np.ndarray, x: np.ndarray, fitness: np.ndarray) -> list[list[int]]:
        """Per client, ``config.probes`` experts it does not train: least measured first, then the
        highest fitness, then the lowest index (deterministic)."""
        k = min(self.config.probes, self.E)
        if k == 0:
            return [[] for _ in rows]
        index = np.broadcast_to(np.arange(self.E), x.shape)
        order = np.lexsort((index, -fitness, self.scorer.N[rows], x), axis=-1)[:, :k]   # trained experts last
        keep = ~np.take_along_axis(x, order, axis=1)
        return [o[m].tolist() for o, m in zip(order, keep)]

    def _per_layer_capacity(self, problem: AlignmentProblem) -> np.ndarray:
        return problem.capacity_array if self.groups is None else problem.group_capacity_matrix.max(axis=1)

    def assigned_count(self, experts: Sequence[int]) -> int:
        """Experts a plan gives a client, as the profiler counts them (per layer with unit groups)."""
        if self.groups is None or not len(experts):
            return len(experts)
        return int(np.bincount(self.groups[np.asarray(experts, dtype=np.int64)]).max())

    def build_problem(self, round: int, rows: np.ndarray, deadline: Optional[float]) -> AlignmentProblem:
        """The round's problem for the clients in ``rows`` (state is not changed)."""
        cap = np.minimum(self.profiler.capacity(rows, deadline), self.E)
        low = np.minimum(self.config.min_experts, cap)
        fields: dict[str, Any] = {}
        if self.groups is not None:          # capacity and min_experts count per layer
            size = np.bincount(self.groups)
            glo = np.minimum(low[:, None], size[None, :])
            gk = np.minimum(cap[:, None], size[None, :])
            fields.update(expert_group=self.groups, group_capacity=gk, group_min_experts=glo)
            cap, low = gk.sum(axis=1), glo.sum(axis=1)
        fitness = self.scorer.fitness(rows, round) - self.config.expert_cost
        demand = float(cap.sum())
        if self.config.expert_cost > 0:       # the band follows the pairs worth their cost
            demand = float(np.clip((fitness > 0).sum(axis=1), low, cap).sum())
        if self.config.tie_break:             # its own stream: spawn_key keeps it apart from any [seed, ...] stream
            ties = np.random.default_rng(np.random.SeedSequence([self.config.seed, round], spawn_key=(TIE_STREAM,)))
            fitness = fitness + self.config.tie_break * ties.random(fitness.shape)
        fitness = fitness + self.monitor.fitness_boost(demand)[None, :]
        if self.config.band == "demand":      # share the demand among the experts clients want most
            wanted = len(np.unique(fitness[cap > 0].argmax(axis=1))) if (cap > 0).any() else self.E
            lower, upper = self.monitor.bounds(demand * self.E / wanted, self.config.tolerance)
        else:
            lower, upper = self.monitor.bounds(demand, self.config.tolerance)
        if self.config.expert_cost > 0 or self.config.band == "demand":       # experts may idle
            lower = np.zeros_like(lower)
        if self.config.expert_memory is not None:
            usage = np.asarray(self.config.expert_memory, dtype=float)
            budget = self.profiler.budget(rows)
            cheapest = np.sort(usage)
            need = np.where(low > 0, np.cumsum(cheapest)[np.maximum(low - 1, 0)], 0.0)
            low = np.where(need <= budget + 1e-9, low, 0)
            if self.groups is not None:
                fields["group_min_experts"] = np.where((low == 0)[:, None], 0, fields["group_min_experts"])
            fields.update(usage=usage, budget=budget)
        if self.config.min_group > 1:
            fields["expert_min_group"] = self.planned_floor(rows)
        return AlignmentProblem(fitness=fitness, capacity=cap, min_experts=low, expert_min_load=lower,
                                expert_max_load=upper, previous=self.held[rows],
                                switch_penalty=self.config.switch_penalty,
                                client_ids=[self.client_ids[r] for r in rows], **fields)

    def _solve(self, problem: AlignmentProblem, round: int) -> AlignmentResult:
        """The configured solve.  With a privacy floor and a soft band, the band is first kept
        hard (the flow's exact search over which experts train); only when that is infeasible
        is the band priced, by CP-SAT.  Whatever CP-SAT solves here runs within ``time_limit``
        (``FLOOR_SOFT_LIMIT`` seconds when none is set: its proofs stall on tie-broken fitness).
        The last round's result is the warm start (``solve(warm_start=...)``: it changes the time,
        never the plan's optimality)."""
        cfg = self.config
        seed = cfg.seed + round
        if not (cfg.soft and problem.has_min_group):
            return solve(problem, backend=cfg.backend, time_limit=cfg.time_limit, seed=seed, soft=cfg.soft,
                         warm_start=self.last_result if cfg.warm_start else None)
        exact_flow = problem.is_flow and cfg.backend in ("auto", "flow")
        hard = solve(problem, backend=cfg.backend, seed=seed,
                     time_limit=cfg.time_limit or (None if exact_flow else FLOOR_SOFT_LIMIT))
        if hard.status is not SolveStatus.INFEASIBLE:
            return hard
        soft = solve(problem, backend="cpsat" if cfg.backend in ("auto", "flow") else cfg.backend,
                     time_limit=cfg.time_limit or FLOOR_SOFT_LIMIT, seed=seed, soft=True)
        soft.explanation = f"the band cannot be met with the privacy floor ({hard.explanation}); priced instead" + (
            f"; {soft.explanation}" if soft.explanation else "")
        return soft

    def planned_floor(self, rows: np.ndarray) -> int:
        """The privacy floor to plan with: ``min_group``, or with ``over_provision``
        ``ceil(min_group / r)`` where ``r`` is the mean completion rate of the clients in ``rows``
        (at least 0.05), at most ``len(rows)`` and never below ``min_group``."""
        m = self.config.min_group
        if not self.config.over_provision or m <= 1:
            return m
        rate = float(np.clip(self.profiler.completion_rate(rows).mean(), 0.05, 1.0)) if len(rows) else 1.0
        return max(m, min(int(math.ceil(m / rate - 1e-9)), len(rows)))

    # ---- observing ----------------------------------------------------------------------------
    def _parse(self, round: int, reports: Iterable[Union[ClientReport, dict]]) -> list[tuple[int, ClientReport]]:
        if self.pending is None or self.pending["round"] != round:
            last = None if self.pending is None else self.pending["round"]
            raise RoundError(f"round {round} has no open plan (open plan: {last}); plan it before observing")
        parsed: list[tuple[int, ClientReport]] = []
        seen: set[Label] = set()
        problems = []
        try:
            checked = _REPORTS.validate_python(list(reports))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            raise ReportError(f"reports{where}: {err['msg']}") from None
        for rep in checked:
            cid = rep.client_id
            row = self._rows.get(cid)
            planned = None if row is None else self.pending["experts"].get(str(row))
            if cid in seen:
                problems.append(f"client_id {cid!r} reported more than once")
            elif planned is None:
                problems.append(f"client_id {cid!r} was not planned in round {round}")
            else:
                names = [e.expert for e in rep.experts]
                if len(set(names)) != len(names):
                    problems.append(f"client {cid!r} reported an expert more than once: {names}")
                for e in names:
                    if e >= self.E:
                        problems.append(f"client {cid!r} reported expert {e}; experts are 0..{self.E - 1}")
                    elif e not in planned:
                        problems.append(f"client {cid!r} reported expert {e}, which it was not assigned "
                                        f"(assigned: {planned})")
                asked = self.pending.get("probes", {}).get(str(row), [])
                probed = [e.expert for e in rep.probes]
                if len(set(probed)) != len(probed):
                    problems.append(f"client {cid!r} reported a probe more than once: {probed}")
                extra = [e for e in probed if e not in asked]
                if extra:
                    problems.append(f"client {cid!r} reported probes {extra} it was not asked for (asked: {asked})")
                if rep.routing is not None and len(rep.routing) != self.E:
                    problems.append(f"client {cid!r}: routing must have {self.E} entries; got {len(rep.routing)}")
                parsed.append((row, rep))
            seen.add(cid)
        if problems:
            raise ReportError("; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
        return parsed

    def observe_round(self, round: int, reports: Iterable[Union[ClientReport, dict]]) -> RoundSummary:
        """Learn from the round's reports; every report is checked before anything changes."""
        parsed = self._parse(round, reports)
        plan = self.pending["experts"]
        deadline = self.pending["deadline"]
        clients = np.zeros(self.E)
        samples = np.zeros(self.E)
        upd_rows, upd_experts, losses, accs = [], [], [], []
        unfinished, reported_rows = [], set()
        probes: list[tuple[int, Any]] = []
        down = up = 0
        for row, rep in parsed:
            reported_rows.add(row)
            assigned = self.assigned_count(plan[str(row)])
            self.profiler.observe(row, assigned=assigned, train_seconds=rep.train_seconds,
                                  download_seconds=rep.download_seconds, finished=rep.finished, deadline=deadline)
            self._routing(row, rep.routing, "routing")
            down += rep.bytes_down
            up += rep.bytes_up
            probes.extend((row, pr) for pr in rep.probes)     # measured before training: kept if unfinished
            if not rep.finished:
                unfinished.append(rep.client_id)
                continue
            self.held[row] = False
            for er in rep.experts:
                self.held[row, er.expert] = True
                clients[er.expert] += 1
                samples[er.expert] += er.samples
                upd_rows.append(row)
                upd_experts.append(er.expert)
                losses.append(er.mean_loss)
                accs.append(er.accuracy)
        dropouts = []
        for key, experts in plan.items():
            row = int(key)
            if row not in reported_rows and experts:
                self.profiler.dropout(row, self.assigned_count(experts))
                dropouts.append(self.client_ids[row])
        mean_accuracy = float(np.mean(accs)) if accs else None
        for row, pr in probes:
            upd_rows.append(row)
            upd_experts.append(pr.expert)
            losses.append(pr.mean_loss)
            accs.append(pr.accuracy)
        if upd_rows:
            self.scorer.update(np.array(upd_rows), np.array(upd_experts), np.array(losses), np.array(accs))
        self.monitor.record(round, clients, samples)
        self.pending = None
        stats = self.monitor.stats()
        ratio = stats["max_min_round"]
        return RoundSummary(round=round, reported=[rep.client_id for _, rep in parsed], dropouts=dropouts,
                            unfinished=unfinished, expert_clients=clients.tolist(), expert_samples=samples.tolist(),
                            cv_round=stats["cv_round"], cv_cumulative=stats["cv_cumulative"],
                            max_min_round=ratio if np.isfinite(ratio) else None,
                            rounds_since_trained=self.monitor.rounds_since_trained(round).astype(int).tolist(),
                            mean_accuracy=mean_accuracy, bytes_down=down, bytes_up=up)

    # ---- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rows, experts = np.nonzero(self.held)
        return {"generation": self.generation or 0, "version": STATE_VERSION, "num_experts": self.E, "config": self.config.model_dump(mode="json"),
                "client_ids": self.client_ids, "held": [rows.tolist(), experts.tolist()],
                "scorer": self.scorer.state(), "monitor": self.monitor.state(), "profiler": self.profiler.state(),
                "pending": self.pending}

    def save(self, path: Union[str, Path]) -> None:
        """Write the whole state as JSON, atomically and under the file's lock.

        The file carries a generation number.  ``save`` refuses (StateError) to overwrite a file
        that another writer changed since this coordinator loaded or last saved it, or that it
        never loaded: plain ``load`` ... ``save`` from two processes would otherwise lose one of
        them silently.  :meth:`session` serialises such writers.
        """
        with locked(path):
            on_disk = generation_on_disk(path)
            if on_disk is not None and on_disk != self.generation:
                mine = "it never loaded" if self.generation is None else f"it loaded generation {self.generation}"
                raise StateError(f"state file {path} is at generation {on_disk}, but {mine}: another writer changed "
                                 f"it; load it again (AlignmentCoordinator.session serialises writers)")
            state = self.state()
            state["generation"] += 1
            write_atomic(path, json.dumps(state, allow_nan=False))
            self.generation = state["generation"]

    @classmethod
    def from_state(cls, state: Any, *, num_experts: Optional[int] = None) -> "AlignmentCoordinator":
        """Restore a coordinator from :meth:`state`; every field is checked first (StateError)."""
        if not isinstance(state, dict):
            raise StateError(f"state must be a JSON object; got {type(state).__name__}")
        try:
            config = CoordinatorConfig.model_validate(state.get("config"))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in ("config", *err["loc"]))
            raise StateError(f"state field {where}: {err['msg']}; got {err.get('input')!r:.80}") from None
        checked = check_state(state, window=config.capacity.window)
        E = checked["E"]
        if num_experts is not None and E != num_experts:
            raise StateError(f"state is for {E} experts, not {num_experts}")
        try:
            coord = cls(E, config=config)
        except ValueError as exc:
            raise StateError(f"state field config: {exc}") from None
        ids = checked["client_ids"]
        coord._ensure(ids)
        coord.held[checked["held_rows"], checked["held_experts"]] = True
        coord.scorer.Q, coord.scorer.N = checked["Q"], checked["N"]
        mon = checked["monitor"]
        for name, value in mon.items():
            setattr(coord.monitor, name, value)
        for name, value in checked["profiler"].items():
            setattr(coord.profiler, name, value)
        coord.pending = checked["pending"]
        coord.generation = checked["generation"]
        return coord

    @classmethod
    def load(cls, path: Union[str, Path], *, num_experts: Optional[int] = None) -> "AlignmentCoordinator":
        """Restore a coordinator saved with :meth:`save`; raises StateError naming what is wrong."""
        text = read_text(path, "state", StateError)
        try:
            state = json.loads(text)
        except RecursionError:
            raise StateError(f"state file {path} nests JSON too deeply") from None
        except ValueError as exc:          # invalid JSON, or an integer too long to read
            raise StateError(f"state file {path} is not valid JSON: {str(exc)[:200]}") from None
        return cls.from_state(state, num_experts=num_experts)

    @classmethod
    @contextlib.contextmanager
    def session(cls, path: Union[str, Path], *, num_experts: Optional[int] = None,
                config: Optional[CoordinatorConfig] = None,
                timeout: Optional[float] = 60.0) -> Iterator["AlignmentCoordinator"]:
        """Load -> (your changes) -> save under the state file's exclusive lock.

        A missing file starts a new coordinator (``num_experts`` and ``config`` needed); the
        state is saved only when the block ends without an exception.  Another process holding
        the lock longer than ``timeout`` seconds raises StateError.
        """
        with locked(path, timeout=timeout):
            if Path(path).exists():
                coord = cls.load(path, num_experts=num_experts)
            elif num_experts is None:
                raise StateError(f"state file {path} does not exist (give num_experts to start a new one)")
            else:
                coord = cls(num_experts, config=config)
            yield coord
            coord.save(path)


__all__ = ["AlignmentCoordinator", "CoordinatorConfig", "ReportError", "RoundError", "StateError"]
