"""Framework-neutral messages of a training round, as pydantic models with JSON forms.

``ClientStatus`` (a client available now, with an optional fresh self-report) goes into
``AlignmentCoordinator.plan_round``, which returns a ``RoundPlan``; each client's
``ClientReport`` (one ``ExpertReport`` per expert it trained, and per expert it was asked to
probe) goes into ``observe_round``,
which returns a ``RoundSummary``.  Experts are indices ``0..E-1``.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from .problem import MAX_COUNT, MAX_MAGNITUDE

MAX_EXAMPLES = 10 ** 12
"""Most samples or tokens a reply may claim (an LLM client's tokens fit)."""


def _label(value: Any) -> Any:
    """A client label is an integer or a string: booleans (JSON true/false) are refused, numpy
    integers become ints."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"a client id must be an integer or a string, not a boolean; got {value!r}")
    if isinstance(value, np.integer):
        return int(value)
    if not isinstance(value, (int, str)):
        raise ValueError(f"a client id must be an integer or a string; got {type(value).__name__}")
    return value


Label = Annotated[Union[int, str], BeforeValidator(_label)]
NonNegative = Annotated[float, Field(ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False)]
MAX_BYTES = 10 ** 18


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientStatus(_Model):
    """A client available for this round, and what it says about itself (all optional)."""

    client_id: Label
    memory: Optional[float] = Field(None, ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                    description="memory for experts (budget units)")
    throughput: Optional[float] = Field(None, gt=0, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                        description="training samples per second")
    bandwidth: Optional[float] = Field(None, gt=0, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                       description="download bytes per second")
    samples: Optional[int] = Field(None, ge=0, le=MAX_COUNT, description="local training samples per expert pass")
    max_experts: Optional[int] = Field(None, ge=0, le=MAX_COUNT, description="most experts it will train")
    configured_experts: Optional[int] = Field(None, ge=0, le=MAX_COUNT, description=(
        "experts its operator configured (Flower node config, NVFlare site config): a client never planned "
        "starts there instead of the profiler's default; an upper limit like max_experts"))
    routing: Optional[list[NonNegative]] = Field(None, description="samples the gate routes to each expert")
    label: Optional[str] = Field(None, max_length=200, description="readable name (partition id, site name)")


class ExpertReport(_Model):
    """Feedback of one trained (client, expert) pair."""

    expert: int = Field(ge=0, le=MAX_COUNT)
    samples: int = Field(0, ge=0, le=MAX_EXAMPLES, description="samples (or tokens) routed to this expert")
    mean_loss: float = Field(ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False, description="mean training loss on those samples")
    accuracy: float = Field(ge=0, le=1, allow_inf_nan=False, description="accuracy on those samples")


class ClientReport(_Model):
    """What one planned client sends back after the round."""

    client_id: Label
    finished: bool = True
    train_seconds: float = Field(0.0, ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False)
    download_seconds: float = Field(0.0, ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False)
    bytes_down: int = Field(0, ge=0, le=MAX_BYTES)
    bytes_up: int = Field(0, ge=0, le=MAX_BYTES)
    routing: Optional[list[NonNegative]] = None
    experts: list[ExpertReport] = Field(default_factory=list)
    probes: list[ExpertReport] = Field(
        default_factory=list, description="fitness of experts the plan asked it to probe (evaluated, not trained)")


class PlannedClient(_Model):
    client_id: Label
    experts: list[int]
    capacity: int = Field(description="experts it could take (per layer, with per-layer units)")
    label: Optional[str] = None
    probe: list[int] = Field(default_factory=list, description="experts to evaluate on held-out data, not train")


class RoundPlan(_Model):
    """Each available client's experts for the round, and the figures the plan used."""

    round: int
    clients: list[PlannedClient]
    status: str
    backend: Optional[str] = None
    objective: Optional[float] = None
    gap: Optional[float] = None
    solve_seconds: float = 0.0
    deadline: Optional[float] = None
    expert_min_load: list[float] = Field(default_factory=list)
    expert_max_load: list[float] = Field(default_factory=list)
    planned_load: list[int] = Field(default_factory=list)
    planned_cv: float = 0.0
    min_group: Optional[int] = Field(None, description=(
        "the privacy floor the plan keeps per trained expert (the configured one, raised for expected dropouts)"))
    explanation: Optional[str] = None
    _result: object = PrivateAttr(default=None)

    @property
    def result(self):
        """The :class:`AlignmentResult` behind the plan (not part of the JSON form)."""
        return self._result

    def experts_of(self, client_id: Label) -> list[int]:
        for planned in self.clients:
            if planned.client_id == client_id:
                return planned.experts
        raise KeyError(f"client_id {client_id!r} is not in the plan of round {self.round}")


class RoundSummary(_Model):
    """What the coordinator learnt from a round's reports."""

    round: int
    reported: list[Label]
    dropouts: list[Label]
    unfinished: list[Label]
    expert_clients: list[float]
    expert_samples: list[float]
    cv_round: float
    cv_cumulative: float
    max_min_round: Optional[float]
    rounds_since_trained: list[int]
    mean_accuracy: Optional[float] = None
    bytes_down: int = 0
    bytes_up: int = 0
