"""The numpy MoE, the data, and the end-to-end training loop."""

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from alignment_solver.training.data import (DOMAIN_TRANSFORMS, load_digits, load_npz, load_shifted_digits,
                                            make_synthetic, partition)
from alignment_solver.training.model import MoE, init_params
from alignment_solver.training.config import SimConfig
from alignment_solver.training.simulate import simulate
from alignment_solver.training.world import World


@pytest.mark.parametrize("hidden, route, allowed", [
    (0, 0.0, [True, True, False, True]), (6, 0.0, [True, True, False, True]),
    (0, 0.7, [True, True, False, True]), (0, 0.7, [False, True, False, False])])
def test_gradients_match_finite_differences(hidden, route, allowed):
    rng = np.random.default_rng(0)
    model = MoE(4, hidden=hidden, top_k=2)
    p = init_params(5, 3, 4, hidden, rng)
    for k in p:
        p[k] = p[k] + rng.normal(0, 0.3, p[k].shape)
    x, y = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
    allowed = np.array(allowed)
    _, grads, _ = model.loss_and_grad(p, x, y, allowed, route_weight=route)
    if route and allowed.sum() == 1:
        assert np.abs(grads["gate.W"]).max() > 1e-3          # a single-expert client still teaches the router
    assert "expert2.W" not in grads and "expert2.W1" not in grads       # masked expert gets nothing
    for key, g in grads.items():
        num = np.zeros_like(p[key])
        for idx in np.ndindex(p[key].shape):
            old = p[key][idx]
            p[key][idx] = old + 1e-6
            up = model.loss_and_grad(p, x, y, allowed, route_weight=route)[0]
            p[key][idx] = old - 1e-6
            down = model.loss_and_grad(p, x, y, allowed, route_weight=route)[0]
            p[key][idx] = old
            num[idx] = (up - down) / 2e-6
        assert np.allclose(num, g, atol=1e-7), key


def test_routing_respects_the_mask_and_top_k():
    rng = np.random.default_rng(1)
    model = MoE(5, top_k=2)
    p = init_params(4, 3, 5, 0, rng)
    _, sel = model.route(p, rng.normal(size=(20, 4)), np.array([1, 0, 1, 1, 0], bool))
    assert sel.sum(axis=1).tolist() == [2] * 20 and not sel[:, [1, 4]].any()


def test_partitions_cover_and_skew():
    rng = np.random.default_rng(0)
    data = load_digits(rng)
    for how in ("iid", "dirichlet", "classes"):
        parts = partition(data, 20, how, rng, alpha=0.3, classes_per_client=2)
        assert len(parts) == 20 and all(len(p) >= 2 for p in parts)
    two = partition(data, 20, "classes", rng, classes_per_client=2)
    assert max(len(np.unique(data.y_train[p])) for p in two) <= 2
    synth = make_synthetic(2000, rng, domains=3)
    doms = partition(synth, 10, "domains", rng)
    assert max(len(np.unique(synth.domain_train[p])) for p in doms) <= 2


def _softmax_regression_accuracy(x, y, xt, yt, classes, epochs=60, lr=0.5):
    """One linear softmax model by full-batch gradient descent (the single-expert baseline)."""
    W, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(epochs * 5):
        z = x @ W + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        W -= lr * x.T @ (p - onehot) / len(y)
        b -= lr * (p - onehot).mean(axis=0)
    return float(((xt @ W + b).argmax(axis=1) == yt).mean())


def test_shifted_digits_needs_one_model_per_domain():
    data = load_shifted_digits(np.random.default_rng(0), domains=4)
    assert data.x_train.shape[1] == 64 and data.classes == 10 and len(DOMAIN_TRANSFORMS) == 6
    dom, rng = data.domain_train, np.random.default_rng(1)
    cut = rng.random(len(dom)) < 0.75
    x, y = data.x_train, data.y_train
    one = _softmax_regression_accuracy(x[cut], y[cut], x[~cut], y[~cut], 10)
    per = np.mean([_softmax_regression_accuracy(x[cut & (dom == k)], y[cut & (dom == k)],
                                                x[~cut & (dom == k)], y[~cut & (dom == k)], 10) for k in range(4)])
    assert per > 0.85 and one < per - 0.2, (one, per)


def test_unequal_domains_and_one_domain_per_client():
    rng = np.random.default_rng(0)
    data = load_shifted_digits(rng, domains=4, sizes="unequal")
    counts = np.bincount(data.domain_train, minlength=4)
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0, counts
    synth = make_synthetic(4000, rng, domains=4, sizes="unequal")
    assert np.bincount(synth.domain_train)[0] > 1.5 * np.bincount(synth.domain_train)[3]
    parts = partition(data, 12, "domains", rng, domains_per_client=1)
    assert all(len(np.unique(data.domain_train[p])) == 1 for p in parts if len(p) > 2)
    with pytest.raises(ValueError, match="1..6 domains"):
        load_shifted_digits(rng, domains=7)


def test_npz_loader_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "no_y.npz", x=np.zeros((20, 3)))
    with pytest.raises(ValueError, match=r"missing \['y'\]"):
        load_npz(tmp_path / "no_y.npz", rng)
    np.savez(tmp_path / "short.npz", x=np.zeros((20, 3)), y=np.zeros(19))
    with pytest.raises(ValueError, match="same N"):
        load_npz(tmp_path / "short.npz", rng)
    np.savez(tmp_path / "ok.npz", x=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    assert load_npz(tmp_path / "ok.npz", rng).classes == 2


@pytest.mark.parametrize("fields, words", [
    ({"clients": 0}, "clients"), ({"max_capacity": 9}, "must be <= experts"), ({"alpha": 0}, "alpha"),
    ({"strategies": ["best"]}, "strategies"), ({"dataset": "mnist"}, "dataset"), ({"dataset": "npz"}, "npz_path"),
    ({"rounds": -1}, "rounds"), ({"strategies": []}, "strategies"), ({"seeds": 0}, "seeds"),
    ({"probes": {"alignd": 1}}, r"keys must be among \['random'.*got 'alignd'"),
    ({"switch_penalty": {"aligned": -0.1}}, r"switch_penalty\['aligned'\] must be a number >= 0; got -0.1"),
])
def test_bad_config_is_refused_before_training(fields, words):
    with pytest.raises(ValidationError, match=words):
        SimConfig(**fields)


def test_knobs_are_per_strategy_and_default_to_the_tuned_ones():
    from alignment_solver.training.config import TUNED_PROBES

    cfg = SimConfig()
    assert cfg.knob("probes", "greedy") == TUNED_PROBES["greedy"] and cfg.knob("probes", "random") == 0
    assert SimConfig(probes=2).knob("probes", "aligned") == 2
    assert SimConfig(switch_penalty={"aligned": 0.1}).knob("switch_penalty", "greedy_sticky") == 0.02


def tiny(**kw):
    """The plain-digits loop of the earlier releases (one averaged gate, fitness on training data)."""
    base = dict(dataset="digits", clients=12, experts=4, rounds=6, max_capacity=2, router="global", fitness="train",
                probes=0, route_weight=0.0, gate_average="all", expert_cost=0.0, devices="none", deadline=None,
                tolerance=0.1, band="fair", strategies=["random", "greedy", "round_robin", "aligned", "aligned_budget"])
    base.update(kw)
    return SimConfig(**base)


def test_every_strategy_learns_and_respects_capacities():
    cfg = tiny()
    out = simulate(cfg, write=False, show_progress=False)
    world = World(cfg)
    for s in cfg.strategies:
        mine = [r for r in out["rows"] if r["strategy"] == s]
        assert mine[-1]["accuracy"] > 0.5, (s, mine[-1]["accuracy"])       # chance is 0.1
        assert all(sum(r["load"]) <= world.capacity.sum() for r in mine)
    aligned = [r for r in out["rows"] if r["strategy"] == "aligned"]
    assert max(r["planned_cv"] for r in aligned[2:]) <= 0.35                 # 12 clients: band is coarse
    assert not any(r["fallback"] for r in out["rows"]), "a solver-planned round fell back to greedy"


def test_a_round_planned_by_the_greedy_fallback_is_counted():
    from alignment_solver import AlignmentProblem, solve
    from alignment_solver.rounds import RoundPlan
    from alignment_solver.training.metrics import fallback as _fallback

    problem = AlignmentProblem(fitness=np.eye(2), capacity=1)
    plan = RoundPlan(round=0, clients=[], status="feasible", backend="greedy")
    plan._result = solve(problem, backend="greedy")
    assert not _fallback(plan)                                              # greedy chosen, not fallen back to
    plan.explanation = "cpsat: no_solution_found (...); planned with the greedy fallback"   # the coordinator's
    assert _fallback(plan)
    plan = RoundPlan(round=0, clients=[], status="feasible")
    plan._result = solve(problem, backend="flow")
    assert not _fallback(plan)
    plan._result.stats["source"] = "greedy fallback"                       # the deadline runner's hand-over
    assert _fallback(plan)


def test_aligned_keeps_the_load_band_and_same_seed_same_metrics(tmp_path):
    cfg = tiny(clients=40, rounds=5, max_capacity=3, strategies=["aligned"], output=str(tmp_path))
    a = simulate(cfg, show_progress=False)
    b = simulate(cfg, show_progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "solve_ms"} for r in rows]  # noqa: E731
    assert strip(a["rows"]) == strip(b["rows"])
    assert max(r["planned_cv"] for r in a["rows"][1:]) <= cfg.tolerance + 0.05
    folder = tmp_path / cfg.run_name
    assert {p.name for p in folder.iterdir()} == {"metrics.csv", "summary.json", "rounds.jsonl", "accuracy.png",
                                                     "load_heatmap.png"}
    assert json.loads((folder / "summary.json").read_text())["summary"]["aligned"]["final_accuracy"] > 0.5


def test_simulate_cli_rejects_bad_flags_before_training(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "alignment_solver.cli", "simulate", *args],
                              capture_output=True, text=True, timeout=300)

    bad = run("--clients", "0")
    assert bad.returncode == 2 and "clients" in bad.stderr and "Traceback" not in bad.stderr
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 2)))
    bad = run("--dataset", "npz", "--npz-path", str(tmp_path / "bad.npz"))
    assert bad.returncode == 2 and "missing ['y']" in bad.stderr
    (tmp_path / "cfg.yaml").write_text("clients: 8\nexperts: 3\nrounds: 2\nmax_capacity: 2\n")
    ok = run("--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path), "--name", "t")
    assert ok.returncode == 0, ok.stderr
    assert "aligned" in ok.stdout and (tmp_path / "t" / "metrics.csv").exists()


def test_a_gate_without_gradient_is_not_averaged_in_when_asked():
    from alignment_solver.training.client import local_train

    rng = np.random.default_rng(0)
    model = MoE(4)
    p = init_params(5, 3, 4, 0, rng)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    keys = lambda cfg, experts: set(local_train(model, p, x, y, experts, cfg, np.random.default_rng(1))[0])  # noqa: E731
    plain = dict(route_weight=0.0, router="global")
    assert "gate.W" in keys(SimConfig(**plain, gate_average="all"), [2])        # "all": every client returns it
    assert "gate.W" not in keys(SimConfig(**plain, gate_average="updated"), [2])  # one expert: no gradient, not sent
    assert "gate.W" in keys(SimConfig(**plain, gate_average="updated"), [1, 2])
    local, _ = local_train(model, p, x, y, [2], SimConfig(gate_average="updated", route_weight=0.5),
                           np.random.default_rng(1))
    assert not np.allclose(local["gate.W"], p["gate.W"])                       # the routing loss teaches it


def test_a_local_router_stays_with_its_client():
    """router="local": the client's router takes the mixture gradient and is never sent; the global
    gate copy it sends moved only by the routing loss toward its experts."""
    from alignment_solver.training.client import local_train

    rng = np.random.default_rng(0)
    model = MoE(4)
    p = init_params(5, 3, 4, 0, rng)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    router = {k: p[k].copy() for k in ("gate.W", "gate.b")}
    before = {k: v.copy() for k, v in router.items()}
    local, _ = local_train(model, p, x, y, [1, 2], SimConfig(route_weight=0.0), np.random.default_rng(1), router)
    assert set(local) == {"gate.W", "gate.b", "expert1.W", "expert1.b", "expert2.W", "expert2.b"}
    assert not np.allclose(router["gate.W"], before["gate.W"])               # trained in place, kept locally
    assert not np.allclose(local["gate.W"], router["gate.W"])                 # what is sent is another gate
    share = lambda g: (np.exp(x @ g["gate.W"] + g["gate.b"])[:, [1, 2]].sum(1)  # noqa: E731
                       / np.exp(x @ g["gate.W"] + g["gate.b"]).sum(1)).mean()
    assert share(local) > share(p) + 0.1                                        # routed toward its experts


def test_domain_loop_specialises_keeps_capacity_and_clock():
    """The default loop on shifted digits: fitness-driven plans beat random and single-expert FedAvg,
    the oracle bound is the best, nobody exceeds its capacity, late clients are dropped, and the
    simulated clock and bytes add up."""
    cfg = SimConfig(clients=30, rounds=12, strategies=["random", "greedy", "aligned", "oracle", "fedavg"])
    other = simulate(cfg.model_copy(update={"seed": 1}), write=False, show_progress=False)
    out = simulate(cfg, write=False, show_progress=False)
    world = World(cfg)
    last = {s: [r for r in out["rows"] if r["strategy"] == s][-1] for s in cfg.strategies}
    final = {s: (last[s]["accuracy"] + other["summary"][s]["final_accuracy"]) / 2 for s in cfg.strategies}
    assert last["oracle"]["personalised_accuracy"] > 0.8
    for s in ("greedy", "aligned", "oracle"):              # mean of two paired seeds
        assert final[s] > final["fedavg"] + 0.05, (s, final)
        assert final[s] > final["random"] + 0.05, (s, final)
    assert last["fedavg"]["untrained"] == cfg.experts - 1
    for r in out["rows"]:
        assert sum(r["load"]) <= world.capacity.sum()
        assert r["round_seconds"] <= cfg.deadline + 1e-9
    assert sum(r["late"] for r in out["rows"]) > 0                          # strong devices: some miss the deadline
    for s in cfg.strategies:
        mine = [r for r in out["rows"] if r["strategy"] == s]
        assert mine[-1]["sim_seconds"] == pytest.approx(sum(r["round_seconds"] for r in mine))
    assert out["summary"]["oracle"]["mb_moved"] < out["summary"]["random"]["mb_moved"]


def test_nmi_matches_scikit_learn():
    from sklearn.metrics import normalized_mutual_info_score

    from alignment_solver.training.metrics import nmi

    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.integers(0, 4, 200), rng.integers(0, 6, 200)
        b[:100] = a[:100]
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b))
    assert nmi(np.zeros(5), np.zeros(5)) == 1.0


def test_strategies_of_a_seed_share_clients_dropouts_and_data_order(tmp_path):
    """Common random numbers: rounds.jsonl shows the same available clients for every strategy, and
    a client planned by two strategies in one round drops out of both or of neither."""
    cfg = SimConfig(dataset="synthetic", synthetic_samples=1500, clients=16, rounds=4, participation=0.6,
                    dropout=0.3, strategies=["aligned", "greedy", "greedy_sticky", "dense", "random"],
                    output=str(tmp_path), name="crn")
    simulate(cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "crn" / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5 and set(rows[0]) == {"strategy", "round", "available", "planned", "dropped"}
    world = World(cfg)
    for r in range(4):
        mine = [row for row in rows if row["round"] == r]
        assert all(row["available"] == world.available(r).tolist() for row in mine)
        drops = world.drops(r)
        for row in mine:
            assert set(row["dropped"]) <= set(row["planned"]) <= set(row["available"])
            assert row["dropped"] == [c for c in row["planned"] if drops[c]]
    assert any(row["dropped"] for row in rows)
    a, b = World(cfg).local_rng(2, 5), World(cfg).local_rng(2, 5)
    assert np.array_equal(a.permutation(50), b.permutation(50))
    assert not np.array_equal(world.local_rng(2, 5).permutation(50), world.local_rng(2, 6).permutation(50))


def test_dense_trains_every_expert_and_pays_for_it():
    cfg = SimConfig(dataset="synthetic", synthetic_samples=1500, clients=12, rounds=2, experts=4,
                    strategies=["dense", "aligned"], devices="strong", deadline=5.0)
    out = simulate(cfg, write=False, show_progress=False)
    dense = [r for r in out["rows"] if r["strategy"] == "dense"]
    aligned = [r for r in out["rows"] if r["strategy"] == "aligned"]
    assert all(r["experts_per_client"] == 4 for r in dense)
    assert sum(r["bytes_down"] for r in dense) > 1.5 * sum(r["bytes_down"] for r in aligned)
    assert sum(r["late"] for r in dense) >= sum(r["late"] for r in aligned)


def test_sticky_greedy_keeps_what_a_client_held():
    from alignment_solver import AlignmentProblem
    from alignment_solver.training.strategies import make_assign

    rng = np.random.default_rng(0)
    problem = AlignmentProblem(fitness=[[0.50, 0.51], [0.2, 0.9]], capacity=1, previous=[[True, False], [True, False]],
                               switch_penalty=0.02)
    greedy, sticky = make_assign("greedy", rng), make_assign("greedy_sticky", rng)
    assert greedy(problem).tolist() == [[False, True], [False, True]]
    assert sticky(problem).tolist() == [[True, False], [False, True]]       # 0.01 gain < 0.02 penalty


def test_fitness_ties_are_broken_at_random_not_by_index():
    """Cold start with equal fitness everywhere: greedy spreads clients over the experts, the same
    way for the same seed, another way for another seed."""
    from alignment_solver import AlignmentCoordinator, CoordinatorConfig
    from alignment_solver.training.strategies import make_assign

    def plan(seed, tie_break=1e-9):
        coord = AlignmentCoordinator(8, config=CoordinatorConfig(seed=seed, tie_break=tie_break))
        greedy = make_assign("greedy", np.random.default_rng(0))
        p = coord.plan_round(0, [{"client_id": c, "max_experts": 1} for c in range(40)], assign=greedy)
        return [tuple(p.experts_of(c)) for c in range(40)]

    first = plan(1)
    assert len({e for e, in first}) >= 6 and first == plan(1) and first != plan(2)
    assert {e for e, in plan(1, tie_break=0.0)} == {0}                       # by index: what we avoid


def test_demand_band_shares_the_demand_among_the_wanted_experts():
    from alignment_solver import AlignmentCoordinator, CoordinatorConfig

    def bounds(band):
        coord = AlignmentCoordinator(4, config=CoordinatorConfig(band=band, tolerance=0.0))
        rows = coord._ensure(list(range(8)))
        coord.scorer.update(rows, rows % 2, np.zeros(8), np.full(8, 0.9))     # best expert: 0 or 1
        problem = coord.build_problem(0, rows, None)
        assert set(problem.fitness.argmax(axis=1).tolist()) == {0, 1}
        return problem.min_load_array, problem.max_load_array

    low, high = bounds("demand")
    assert low.tolist() == [0, 0, 0, 0] and high.tolist() == [4, 4, 4, 4]       # 8 experts wanted, 2 wanted experts
    low, high = bounds("fair")
    assert high.tolist() == [2, 2, 2, 2] and low.tolist() == [2, 2, 2, 2]       # 8 over 4 experts


def test_compare_runs_paired_seeds_and_says_what_the_table_means(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignment_solver.cli", "simulate", "--dataset", "synthetic",
                           "--synthetic-samples", "1500", "--clients", "12", "--rounds", "2", "--seeds", "2",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aligned - this, points" in proc.stdout and "Over 2 paired seeds, aligned is" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-domains-12x8-seed0", "synthetic-domains-12x8-seed1"]


def test_the_verdict_of_a_lone_strategy_says_there_is_nothing_to_compare():
    from alignment_solver.training.compare import interval, verdict

    assert verdict({"reference": "aligned", "seeds": [0, 1], "strategies": {"aligned": {}}}) == \
        "Over 2 seeds only aligned ran: there is nothing to compare it with."
    m, lo, hi = interval([1.0, 3.0])                     # t(1) = 12.706: mean 2, half-width 12.706
    assert (m, round(lo, 3), round(hi, 3)) == (2.0, -10.706, 14.706)
