"""Command line: ``alignment-solver solve|demo|backends|simulate|init|plan|observe``.

Exit codes: 0 solved (optimal or feasible), 1 infeasible or no solution found, 2 invalid input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import ValidationError

from .backends import REGISTRY, available_backends
from .errors import AlignmentError, describe, read_text
from .paths import regular_target, replace_regular
from .problem import AlignmentProblem
from .solve import solve


def _fail(message: str) -> int:
    print(f"alignment-solver: error: {message}", file=sys.stderr)
    return 2


def _one_line(exc: Exception, what: str = "problem") -> str:
    """First line of an error; a pydantic error names its field (``what`` for whole-model checks)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or what
        msg = err["msg"].removeprefix("Value error, ")
        got = f"; got {describe(err['input'])}" if err["loc"] and "got" not in msg else ""
        return f"{where}: {msg}{got}"
    return str(exc).splitlines()[0]


class InputError(Exception):
    """An input file (or stdin) that cannot be read or decoded; the message names it."""


def _read_text(path: str, what: str) -> str:
    return sys.stdin.read() if path == "-" else read_text(path, what, InputError)


def _read_json(path: str, what: str) -> Any:
    text = _read_text(path, what)
    where = "from stdin" if path == "-" else f"file {path}"
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{what} {where} nests JSON too deeply") from None
    except ValueError as exc:          # invalid JSON, or an integer too long to read
        raise InputError(f"{what} {where} is not valid JSON: {str(exc)[:200]}") from None


def _load_problem(path: str) -> AlignmentProblem:
    try:
        return AlignmentProblem.model_validate(_read_json(path, "problem"))
    except RecursionError:
        raise InputError(f"problem {'from stdin' if path == '-' else f'file {path}'} nests lists too deeply") from None


def _check_output(output: Optional[str]) -> None:
    """Refuse an output path that is not a regular file (or one to create in an existing, writable
    folder), before anything is solved or changed.  A symbolic link is followed: its target is
    written."""
    if not output:
        return
    target = regular_target(output, "output", InputError)
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"output {output} is not writable")


def _write_output(text: str, output: Optional[str]) -> None:
    """Write ``text`` to the regular file ``output`` (through a link: its target) atomically, or
    print it; InputError when that cannot be done (nothing is replaced then)."""
    if not output:
        print(text)
        return
    replace_regular(output, text, "output", InputError)


def _print_loads(result) -> None:
    p = result.problem
    load = result.expert_load
    print(f"{'expert':>10} {'load':>7} {'band':>13}")
    for e in range(p.n_experts):
        hi = p.max_load_array[e]
        band = f"{p.min_load_array[e]:g}..{'inf' if not np.isfinite(hi) else f'{hi:g}'}"
        print(f"{str(p.expert_label(e)):>10} {load[e]:>7g} {band:>13}")


def _solve_cmd(args: argparse.Namespace) -> int:
    try:
        _check_output(args.output)
        problem = _load_problem(args.problem)
    except InputError as exc:
        return _fail(str(exc))
    except (ValidationError, ValueError) as exc:
        return _fail(f"invalid problem in {args.problem}: {_one_line(exc)}")
    try:
        result = solve(problem, backend=args.backend, time_limit=args.time_limit, seed=args.seed, soft=args.soft,
                       soft_penalty=args.soft_penalty)
    except (AlignmentError, ValueError, TypeError) as exc:
        return _fail(_one_line(exc))
    print(result.summary())
    if args.output:
        try:
            _write_output(result.model_dump_json(indent=2), args.output)
        except InputError as exc:
            return _fail(str(exc))
    if not result.has_solution:
        print(f"alignment-solver: {result.status.value}: {result.explanation}", file=sys.stderr)
        return 1
    if args.loads:
        _print_loads(result)
    return 0


def _demo_cmd(args: argparse.Namespace) -> int:
    text = resources.files("alignment_solver").joinpath("examples/round.json").read_text()
    problem = AlignmentProblem.model_validate_json(text)
    print(f"example round: {problem.n_clients} clients x {problem.n_experts} experts, capacity 1..3, "
          f"load band {problem.min_load_array.min():g}..{problem.max_load_array.max():g}")
    result = solve(problem, seed=args.seed)
    print(result.summary())
    _print_loads(result)
    for cid in (problem.client_label(c) for c in range(min(5, problem.n_clients))):
        print(f"client {cid}: experts {result.experts_of(cid)}")
    greedy = solve(problem, backend="greedy")
    if greedy.has_solution:
        print(f"greedy baseline: objective {greedy.objective:.4f} "
              f"({100 * (greedy.objective - result.objective) / abs(result.objective):+.2f} % vs optimal)")
    return 0


def _backends_cmd(args: argparse.Namespace) -> int:
    have = set(available_backends())
    for name in REGISTRY:
        print(f"{name:12} {'available' if name in have else 'missing (install the pulp extra)'}")
    return 0


def _init_cmd(args: argparse.Namespace) -> int:
    from .coordinator import AlignmentCoordinator, CoordinatorConfig

    try:
        if regular_target(args.state, "state file", InputError).exists() and not args.force:
            return _fail(f"state file {args.state} exists; pass --force to overwrite it")
        config = CoordinatorConfig.model_validate(_read_json(args.config, "config")) if args.config \
            else CoordinatorConfig()
        AlignmentCoordinator(args.experts, config=config).save(args.state)
    except InputError as exc:
        return _fail(str(exc))
    except (ValidationError, ValueError, OSError) as exc:
        return _fail(_one_line(exc, "config"))
    print(f"wrote {args.state}: {args.experts} experts")
    return 0


def _coordinator_cmd(args: argparse.Namespace) -> int:
    from .coordinator import AlignmentCoordinator

    key = "clients" if args.command == "plan" else "reports"
    try:
        _check_output(args.output)
        if not regular_target(args.state, "state file", InputError).exists():
            raise InputError(f"state file {args.state} does not exist (create it with: alignment-solver init "
                             f"--state {args.state} --experts E)")
        payload = _read_json(args.input, key)
        if isinstance(payload, dict):
            if set(payload) != {key}:
                raise InputError(f"{key} input must be a JSON list or an object {{\"{key}\": [...]}}; "
                                 f"got keys {sorted(payload)}")
            payload = payload[key]
        if not isinstance(payload, list):
            raise InputError(f"{key} input must be a JSON list; got {type(payload).__name__}")
        with AlignmentCoordinator.session(args.state, timeout=args.lock_timeout) as coord:
            if args.command == "plan":
                rnd = args.round if args.round is not None else \
                    (coord.pending["round"] if coord.pending and args.replan else coord.last_round + 1)
                out = coord.plan_round(rnd, payload, deadline=args.deadline, replan=args.replan)
            else:
                rnd = args.round if args.round is not None else (coord.pending or {}).get("round", -1)
                out = coord.observe_round(rnd, payload)
            if args.output:                       # before the save: no state without output
                try:
                    _write_output(out.model_dump_json(indent=2), args.output)
                except InputError as exc:
                    raise InputError(f"{exc}; the state file is unchanged") from None
    except InputError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {exc.filename or args.state}: {exc.strerror}; the state file is unchanged")
    except RecursionError:
        return _fail(f"{key} input nests too deeply")
    except (AlignmentError, ValidationError, ValueError) as exc:
        return _fail(_one_line(exc, key))
    if not args.output:                           # after the save: no plan printed that was not saved
        _write_output(out.model_dump_json(indent=2), None)
    return 0


def _needs_train_extra(module: str, what: str) -> str:
    return f"{what} needs {module}, which is not installed: pip install 'alignment-solver[train]'"


def _simulate_cmd(args: argparse.Namespace) -> int:
    from .training.simulate import SimConfig, simulate, table

    try:
        base = {}
        if args.config:
            if args.config.endswith((".yaml", ".yml")):
                try:
                    import yaml
                except ImportError:
                    return _fail(_needs_train_extra("pyyaml", f"the YAML config {args.config}"))

                base = yaml.safe_load(_read_text(args.config, "config")) or {}
            else:
                base = _read_json(args.config, "config")
        overrides = {k: v for k, v in vars(args).items() if k in SimConfig.model_fields and v is not None}
        cfg = SimConfig.model_validate({**base, **overrides})
        if cfg.dataset == "npz":
            from .training.data import load_npz
            import numpy as _np

            load_npz(cfg.npz_path, _np.random.default_rng(0))
    except InputError as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(f"file not found: {exc.filename}")
    except (ValidationError, ValueError) as exc:
        return _fail(_one_line(exc, "simulate config"))
    if cfg.dataset in ("digits", "shifted_digits"):
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return _fail(_needs_train_extra("scikit-learn", f"the {cfg.dataset} dataset (digits is the default)")
                         + "; or run --dataset synthetic")
    if cfg.seeds > 1:
        from .training.compare import compare, comparison_table, verdict

        started = time.perf_counter()
        result = compare(cfg)
        runs = result["runs"]
        print(comparison_table(cfg, result))
        print(verdict(result))
        seconds = time.perf_counter() - started
    else:
        runs = [simulate(cfg)]
        print(table(cfg, runs[0]["summary"]))
        seconds = runs[0]["seconds"]
    written = ", ".join(["metrics.csv", "rounds.jsonl", "summary.json", *(Path(p).name for p in runs[0]["plots"])])
    folders = " ".join(f"{out['folder']}/" for out in runs)
    print(f"wrote {folders} ({written}) in {seconds:.1f} s")
    if "note" in runs[0]:
        print(f"alignment-solver: {runs[0]['note']}", file=sys.stderr)
    return 0


def _seconds(text: str) -> float:
    """A number of seconds >= 0; ``inf`` or a wait too long to matter means no limit (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (inf: no limit); got {text!r}")
    return value


def _limit(text: str) -> float:
    """A number of seconds > 0; ``inf`` or a limit too large to matter means no limit (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (inf: no limit); got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignment-solver",
                                     description="Client-expert alignment for federated Mixture-of-Experts training.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="solve a problem given as JSON (the AlignmentProblem JSON form)")
    s.add_argument("problem", help="path to the problem JSON, or - for standard input")
    s.add_argument("-o", "--output", help="write the result as JSON to this path")
    s.add_argument("--backend", default="auto", choices=["auto", *REGISTRY],
                   help="solver backend (default: auto = flow when the structure allows it, else cpsat)")
    s.add_argument("--time-limit", type=_limit, default=None, metavar="S",
                   help="time limit in seconds > 0 (default none; inf or 1e7 and more: none)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--soft", action="store_true", help="turn the expert load band into penalised slack")
    s.add_argument("--soft-penalty", type=float, default=None, metavar="P",
                   help="price per unit of band violation with --soft (default: violation minimised first)")
    s.add_argument("--loads", action="store_true", help="print each expert's load and band")
    s.set_defaults(func=_solve_cmd)
    d = sub.add_parser("demo", help="solve the shipped example round and print the assignment summary")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=_demo_cmd)
    b = sub.add_parser("backends", help="list the backends and whether they are installed")
    b.set_defaults(func=_backends_cmd)
    sm = sub.add_parser("simulate", help="federated MoE training: compare alignment strategies end to end")
    sm.add_argument("--config", help="SimConfig as a JSON or YAML file; flags override it")
    sm.add_argument("--dataset", choices=["digits", "shifted_digits", "synthetic", "npz"],
                    help="default shifted_digits (bundled digits under per-domain concept shift); digits: plain")
    sm.add_argument("--npz-path", dest="npz_path", help="a .npz with arrays x (N, D) and y (N,) for --dataset npz")
    sm.add_argument("--synthetic-samples", dest="synthetic_samples", type=int,
                    help="samples of --dataset synthetic (default 20000)")
    sm.add_argument("--synthetic-domains", dest="synthetic_domains", type=int,
                    help="domains of --dataset synthetic (default 4)")
    sm.add_argument("--shifted-domains", dest="shifted_domains", type=int,
                    help="domains of --dataset shifted_digits, 1..6 (default 4)")
    sm.add_argument("--domain-sizes", dest="domain_sizes", choices=["equal", "unequal"],
                    help="domain shares of the domain datasets: equal (default) or 1, 1/2, 1/3, ...")
    sm.add_argument("--domains-per-client", dest="domains_per_client", type=int,
                    help="--partition domains: each client owns 1..this many domains (default 1: one each)")
    sm.add_argument("--partition", choices=["iid", "dirichlet", "classes", "domains"],
                    help="default: domains for shifted_digits and synthetic, dirichlet otherwise")
    sm.add_argument("--alpha", type=float, help="Dirichlet concentration (default 0.3)")
    sm.add_argument("--classes-per-client", dest="classes_per_client", type=int, help="for --partition classes")
    sm.add_argument("--clients", type=int, help="number of clients (default 50)")
    sm.add_argument("--experts", type=int, help="number of experts (default 8)")
    sm.add_argument("--top-k", dest="top_k", type=int, help="experts per sample in the routing (default 2)")
    sm.add_argument("--hidden", type=int, help="expert MLP hidden units; 0 = softmax regression (default)")
    sm.add_argument("--min-capacity", dest="min_capacity", type=int, help="fewest experts a client can hold (1)")
    sm.add_argument("--max-capacity", dest="max_capacity", type=int, help="most experts a client can hold (2)")
    sm.add_argument("--participation", type=float, help="share of clients available per round (1.0)")
    sm.add_argument("--dropout", type=float, help="chance a planned client sends nothing (0.0)")
    sm.add_argument("--rounds", type=int, help="training rounds (default 20)")
    sm.add_argument("--local-epochs", dest="local_epochs", type=int, help="local epochs per round (2)")
    sm.add_argument("--batch-size", dest="batch_size", type=int, help="local mini-batch size (32)")
    sm.add_argument("--lr", type=float, help="local learning rate (0.5)")
    sm.add_argument("--route-weight", dest="route_weight", type=float,
                    help="weight of a routing loss that lets single-expert clients train the gate (default 0.5)")
    sm.add_argument("--gate-average", dest="gate_average", choices=["all", "updated"],
                    help="average the gate over every trained client, or only those that updated it (default)")
    sm.add_argument("--router", choices=["global", "local"],
                    help="global: one averaged gate; local: each client keeps its own router (default)")
    sm.add_argument("--fitness", choices=["train", "heldout"],
                    help="score experts on training samples after training, or held-out before it (default)")
    sm.add_argument("--fitness-mode", dest="fitness_mode", choices=["accuracy", "loss"],
                    help="fitness from accuracy (default) or exp(-loss)")
    sm.add_argument("--probes", type=int, help="untried experts each fitness-driven client scores per round "
                    "(default per strategy, tuned: greedy and greedy_sticky 1, aligned 0)")
    sm.add_argument("--exploration", type=float, help="UCB exploration coefficient (0.05)")
    sm.add_argument("--expert-cost", dest="expert_cost", type=float,
                    help="fitness an extra expert must beat: demand-sized plans (default 0.3; 0: fill capacity)")
    sm.add_argument("--devices", choices=["none", "strong"],
                    help="device heterogeneity: none, or strong (default: speed and bandwidth lognormal(0, 1))")
    sm.add_argument("--deadline", type=float, help="simulated seconds per round, later clients are dropped (default 5; null in a config: none)")
    sm.add_argument("--tolerance", type=float, help="load band half-width (0.3)")
    sm.add_argument("--band", choices=["fair", "demand"],
                    help="aligned's load band: fair (default, tuned) or demand (capped by the demand for the wanted experts)")
    sm.add_argument("--switch-penalty", dest="switch_penalty", type=float,
                    help="fitness cost of a new expert for aligned and greedy_sticky (default, tuned: 0.02 and 0.1)")
    sm.add_argument("--min-group", dest="min_group", type=int,
                    help="privacy floor: each trained expert gets 0 or at least this many clients, and aggregation keeps "
                    "experts fewer finished updates reached (default 0: off)")
    sm.add_argument("--over-provision", dest="over_provision", action=argparse.BooleanOptionalAction, default=None,
                    help="plan the floor higher by the clients' completion rate (default: on)")
    sm.add_argument("--solver-time-limit", dest="solver_time_limit", type=float,
                    help="per-round solve time limit in seconds (default none: solve to optimality)")
    sm.add_argument("--target-accuracy", dest="target_accuracy", type=float, help="for rounds and simulated seconds to target (0.75)")
    sm.add_argument("--strategies", nargs="+", help="among aligned greedy dense greedy_sticky random round_robin "
                    "aligned_budget oracle fedavg (default: aligned greedy dense); the first is the reference")
    sm.add_argument("--seed", type=int, help="random seed (default 0)")
    sm.add_argument("--seeds", type=int, help="paired seeds from --seed, compared with 95%% intervals (default 1)")
    sm.add_argument("--output", help="output folder (default runs)")
    sm.add_argument("--name", help="run name (default derived from the settings)")
    sm.set_defaults(func=_simulate_cmd)
    i = sub.add_parser("init", help="create a coordinator state file")
    i.add_argument("--state", required=True, help="path of the JSON state file to create")
    i.add_argument("--experts", type=int, required=True, help="number of experts")
    i.add_argument("--config", help="CoordinatorConfig as JSON (file path or - for stdin)")
    i.add_argument("--force", action="store_true", help="overwrite an existing state file")
    i.set_defaults(func=_init_cmd)
    for name, flag, what, round_default, output in (
            ("plan", "--clients", "JSON list of client ids or ClientStatus objects (or {\"clients\": [...]})",
             "one after the last observed round", "plan"),
            ("observe", "--reports", "JSON list of ClientReport objects (or {\"reports\": [...]})",
             "the open plan's round", "summary")):
        cmd = sub.add_parser(name, help=f"{name} a round through files; the state is saved after it")
        cmd.add_argument("--state", required=True, help="coordinator state file (updated in place, atomically)")
        cmd.add_argument(flag, dest="input", required=True, help=f"{what}; - for stdin")
        cmd.add_argument("--round", type=int, help=f"round number (default: {round_default})")
        if name == "plan":
            cmd.add_argument("--deadline", type=float, help="round deadline in seconds")
            cmd.add_argument("--replan", action="store_true",
                             help="replace the plan of a round that is planned and not yet observed")
        cmd.add_argument("--lock-timeout", dest="lock_timeout", type=_seconds, default=60.0, metavar="S",
                         help="wait at most S seconds for another process holding the state file (default 60; inf: "
                              "no limit)")
        cmd.add_argument("-o", "--output", help=f"write the {output} JSON here (default: stdout)")
        cmd.set_defaults(func=_coordinator_cmd)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:          # output piped into a reader that stopped early (e.g. head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
