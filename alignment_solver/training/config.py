"""Every option of the training simulation, validated (``alignment-solver simulate`` and the benchmark)."""

from __future__ import annotations

from typing import Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, field_validator, model_validator

#: Knobs chosen on tuning seeds 100-104 of the make-run loop (``python benchmarks/regimes.py --tune``,
#: ``benchmarks/results/regimes_knobs.json``), never on the seeds reported.
TUNED_PROBES = {"aligned": 0, "greedy": 1, "greedy_sticky": 1}
TUNED_SWITCH_PENALTY = {"aligned": 0.02, "greedy_sticky": 0.1}
TUNED_BAND = "fair"

Strategy = Literal["random", "greedy", "greedy_sticky", "round_robin", "aligned", "aligned_budget", "oracle", "fedavg",
                   "dense"]


class SimConfig(BaseModel):
    """Every option of ``alignment-solver simulate``; the defaults are the ``make run`` demo and the
    loop of ``benchmarks/strategies.py``: concept-shifted digits, one domain per client, capacity
    1-2 of 8, local routers, held-out fitness with one probe, demand-sized plans, strongly
    heterogeneous devices with a 5 s deadline; aligned against greedy and dense FedAvg."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["digits", "shifted_digits", "synthetic", "npz"] = "shifted_digits"
    npz_path: Optional[str] = None
    synthetic_samples: int = Field(20000, ge=100)
    synthetic_domains: int = Field(4, ge=1)
    shifted_domains: int = Field(4, ge=1, le=6, description="domains of shifted_digits")
    domain_sizes: Literal["equal", "unequal"] = Field("equal", description="domain shares: equal or 1, 1/2, 1/3...")
    domains_per_client: int = Field(1, ge=1, description="partition 'domains': each client owns 1..this many")
    partition: Optional[Literal["iid", "dirichlet", "classes", "domains"]] = Field(
        None, description="default: domains for shifted_digits and synthetic, dirichlet otherwise")
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1)
    clients: int = Field(50, ge=1)
    experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    hidden: int = Field(0, ge=0, description="expert MLP hidden units; 0 = softmax regression")
    min_capacity: int = Field(1, ge=1)
    max_capacity: int = Field(2, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.5, gt=0)
    route_weight: float = Field(0.5, ge=0, description="routing loss weight: single-expert clients teach the gate")
    gate_average: Literal["all", "updated"] = Field(
        "updated", description="average the gate over every trained client, or only those whose gate had a gradient")
    router: Literal["global", "local"] = Field(
        "local", description="global: one averaged gate; local: each client keeps its own router (FLEX-MoE)")
    fitness: Literal["train", "heldout"] = Field(
        "heldout", description="score each expert on the training samples after training, or held-out before it")
    fitness_mode: Literal["accuracy", "loss"] = Field("accuracy", description="fitness from accuracy or exp(-loss)")
    probes: Union[NonNegativeInt, dict[Strategy, NonNegativeInt]] = Field(
        default_factory=lambda: dict(TUNED_PROBES),
        description="untried experts each fitness-driven client scores per round: one number, or per strategy "
                    "(missing: 0); default: each strategy's best on the tuning seeds")
    exploration: float = Field(0.05, ge=0, description="UCB exploration coefficient of the fitness scorer")
    expert_cost: float = Field(0.3, ge=0, description="fitness an extra expert must beat (demand-sized plans)")
    devices: Literal["none", "strong"] = Field(
        "strong", description="device heterogeneity: identical devices, or speed and bandwidth lognormal(0, 1)")
    deadline: Optional[float] = Field(5.0, gt=0, description="simulated seconds per round; later clients drop")
    tolerance: float = Field(0.3, ge=0)
    band: Literal["fair", "demand"] = Field(
        TUNED_BAND, description="aligned's load band: around the fair share, or capped by the demand for the wanted "
                                "experts; default: the better on the tuning seeds")
    switch_penalty: Union[NonNegativeFloat, dict[Strategy, NonNegativeFloat]] = Field(
        default_factory=lambda: dict(TUNED_SWITCH_PENALTY),
        description="fitness cost of a new expert (aligned, greedy_sticky): one number, or per strategy "
                    "(missing: 0.02); default: each strategy's best on the tuning seeds")
    min_group: NonNegativeInt = Field(0, description=(
        "privacy floor: aligned plans give each trained expert 0 or at least this many clients (over-provisioned "
        "for dropouts with over_provision), and every strategy's aggregation keeps an expert (and the gate) that "
        "fewer finished updates reached; 0 or 1: off"))
    over_provision: bool = Field(True, description="plan the floor higher by the clients' completion rate")
    solver_time_limit: Optional[float] = Field(None, gt=0, description="per-round solve limit (CP-SAT for budgets)")
    target_accuracy: float = Field(0.75, gt=0, le=1)
    strategies: list[Strategy] = Field(default_factory=lambda: ["aligned", "greedy", "dense"], min_length=1)
    seed: int = Field(0, ge=0, le=2 ** 30)
    seeds: int = Field(1, ge=1, le=100, description="paired seeds seed .. seed + seeds - 1 (compare; the CLI)")
    output: str = "runs"
    name: Optional[str] = Field(None, description="run folder inside output: one plain name, no path")

    @field_validator("probes", "switch_penalty", mode="before")
    @classmethod
    def _per_strategy(cls, value, info):
        if isinstance(value, dict):
            names = get_args(Strategy)
            for k, v in value.items():
                if k not in names:
                    raise ValueError(f"{info.field_name} per strategy: keys must be among {list(names)}; got {k!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                    raise ValueError(f"{info.field_name}[{k!r}] must be a number >= 0; got {v!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "SimConfig":
        if self.max_capacity > self.experts:
            raise ValueError(f"max_capacity ({self.max_capacity}) must be <= experts ({self.experts}): "
                             f"a client cannot train more experts than exist")
        if self.min_capacity > self.max_capacity:
            raise ValueError(f"min_capacity ({self.min_capacity}) must be <= max_capacity ({self.max_capacity})")
        if self.dataset == "npz" and not self.npz_path:
            raise ValueError("dataset 'npz' needs npz_path")
        if self.partition is None:
            self.partition = "domains" if self.dataset in ("synthetic", "shifted_digits") else "dirichlet"
        if self.partition == "domains" and self.dataset not in ("synthetic", "shifted_digits"):
            raise ValueError(f"partition 'domains' needs a dataset with domains (synthetic or shifted_digits); "
                             f"got dataset {self.dataset!r}")
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name or "\0" in self.name):
            raise ValueError(f"name must be one folder name inside output (no '/', '\\', '.' or '..'); "
                             f"got {self.name!r}")
        if "oracle" in self.strategies and self.partition != "domains":
            raise ValueError("strategy 'oracle' needs partition 'domains' (the true domains it assigns by)")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be unique; got {self.strategies}")
        return self

    def knob(self, name: str, strategy: str) -> float:
        """``probes`` or ``switch_penalty`` as ``strategy`` runs it."""
        value = getattr(self, name)
        if isinstance(value, dict):
            return value.get(strategy, {"probes": 0, "switch_penalty": 0.02}[name])
        return value

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}-{self.partition}-{self.clients}x{self.experts}-seed{self.seed}"
