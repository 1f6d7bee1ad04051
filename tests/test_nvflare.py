"""NVFlare plug-in: site-side helpers, a simulator run, and a POC deployment with a site killed in round 2."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nvflare") is None, reason="needs the nvflare extra")

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "nvflare_job"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "NVFLARE_POC_WORKSPACE": str(tmp_path / "poc"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def site_records(log: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(log.glob("*.jsonl"))}


def check_history(history: dict, records: dict[str, list[dict]], rounds: int, capacities: dict[str, int],
                  lost: Optional[dict[str, int]] = None) -> None:
    """What must hold in any run: deliveries match the plan, capacities hold, only trained experts change.
    ``lost`` maps a killed site to the round it was killed in: from then on it has no record, and
    NVFlare may still count it connected (until its heartbeat times out), so a plan that names
    it must count it as a dropout."""
    lost = lost or {}
    assert [int(r) for r in history] == list(range(-1, rounds)), sorted(history)
    for r in range(rounds):
        h = history[str(r)]
        for site, experts in h["plan"].items():
            assert len(experts) <= min(h["capacity"][site], capacities[site]), (r, site, experts)
        for site, got in h["received"].items():
            assert got == h["plan"][site], (r, site)
        assert h["changed_experts"] == h["trained_experts"], (r, h)
        for site, lines in records.items():                    # what the site itself saw
            line = [x for x in lines if x["round"] == r]
            if site in lost and r > lost[site]:
                assert not line and (site not in h["plan"] or site in h["dropouts"]), (r, site, h)
                continue
            if site in h["plan"]:
                assert line and line[0]["received"] == line[0]["experts"] == h["plan"][site], (r, site, line)
            else:
                assert not line, (r, site, line)


# ---- site-side helpers ------------------------------------------------------------------------
def test_train_model_refuses_a_delivery_that_does_not_match_the_plan():
    from nvflare.app_common.abstract.fl_model import FLModel

    from alignment_solver.integrations.nvflare import evaluate_model, train_model
    from alignment_solver.training.model import init_params

    rng = np.random.default_rng(0)
    params = init_params(5, 3, 4, 0, rng)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    sent = {k: v for k, v in params.items() if not k.startswith("expert") or k.startswith(("expert1.", "expert2."))}
    with pytest.raises(ValueError, match=r"received the arrays of experts \[1, 2\] but was assigned \[1\]"):
        train_model(FLModel(params=sent, meta={"experts": [1]}, current_round=0), x, y, num_experts=4)
    reply = train_model(FLModel(params=sent, meta={"experts": [2, 1]}, current_round=0), x, y, num_experts=4,
                        max_experts=2)
    assert reply.metrics["experts"] == [2, 1] and reply.metrics["received-experts"] == [1, 2]
    assert reply.metrics["max-experts"] == 2 and reply.metrics["num-examples"] == 40
    assert {k.split(".")[0] for k in reply.params} <= {"gate", "expert1", "expert2"}
    ev = evaluate_model(FLModel(params=params), x, y, num_experts=4).metrics
    assert ev["num-examples"] == 40 and 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0


def test_load_callable_names_what_is_wrong():
    from alignment_solver.integrations.nvflare import load_callable

    assert load_callable("math:sqrt")(4.0) == 2.0
    with pytest.raises(ValueError, match="'package.module:function'; got 'math.sqrt'"):
        load_callable("math.sqrt")
    with pytest.raises(ValueError, match="cannot load 'math:nope'"):
        load_callable("math:nope")
    with pytest.raises(ValueError, match="'math:pi' is not callable"):
        load_callable("math:pi")


# ---- simulator --------------------------------------------------------------------------------
@pytest.mark.slow
def test_simulator_five_sites_three_rounds_one_forging(tmp_path):
    log = tmp_path / "log"
    cmd = [sys.executable, str(JOB / "job.py"), "--simulate", str(tmp_path / "sim"), "--sites", "5", "--rounds", "3",
           "--experts", "6", "--capacities", "1,2,1,3,1", "--log", str(log), "--forge", "site-5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=1200)
    out = tmp_path / "sim" / "server" / "simulate_job"
    assert (out / "aligned_history.json").exists(), (proc.stdout + proc.stderr)[-4000:]
    history = json.loads((out / "aligned_history.json").read_text())
    records = site_records(log)
    assert sorted(records) == [f"site-{k}" for k in range(1, 6)]
    check_history(history, records, 3, {"site-1": 1, "site-2": 2, "site-3": 1, "site-4": 3, "site-5": 1})
    for r in range(3):                                  # site-5's NaN replies are rejected and count as dropouts
        h = history[str(r)]
        assert list(h["rejected"]) == ["site-5"] and "holds NaN" in h["rejected"]["site-5"], h["rejected"]
        assert h["dropouts"] == ["site-5"] and sorted(h["received"]) == [f"site-{k}" for k in range(1, 5)]
    for r in range(3):                                  # experts only the forger held are not trained
        h = history[str(r)]
        honest = set().union(*(set(e) for site, e in h["plan"].items() if site != "site-5"))
        assert set(h["trained_experts"]) == honest, (r, h["plan"], h["trained_experts"])
    assert history["0"]["capacity"] == {"site-1": 1, "site-2": 2, "site-3": 1, "site-4": 3, "site-5": 1}
    assert history["0"]["labels"] == {f"site-{k}": f"site-{k}" for k in range(1, 6)}   # declared before round 0
    central = [history[str(r)]["central"]["accuracy"] for r in range(-1, 3)]
    assert central[-1] > central[0] + 0.3, central
    from alignment_solver import AlignmentCoordinator

    restored = AlignmentCoordinator.load(out / "aligned_state.json", num_experts=6)
    assert restored.last_round == 2 and restored.pending is None
    sys.path.insert(0, str(JOB))
    try:
        import digits_task
    finally:
        sys.path.remove(str(JOB))
    with np.load(out / "aligned_model.npz") as npz:
        final = dict(npz)
    assert sorted(final) == sorted(digits_task.initial_model(6))
    assert digits_task.central_evaluation(final)["accuracy"] == central[-1]


# ---- POC deployment ---------------------------------------------------------------------------
def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def _processes(marker: str):
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def _kill_site(prod: Path, site: str) -> int:
    """SIGKILL every process of a site (its restart loop, client and job processes)."""
    victims = set(_processes(str(prod / site)))
    for p in list(victims):
        try:
            victims |= set(p.children(recursive=True))
        except Exception:
            pass
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except Exception:
            pass
    return len(victims)


@pytest.mark.slow
def test_poc_deployment_survives_a_site_killed_in_round_two(tmp_path):
    env = env_for(tmp_path)
    ports = {"@FED_PORT@": str(free_port()), "@ADMIN_PORT@": str(free_port())}
    text = (JOB / "poc_project.yml").read_text()
    for k, v in ports.items():
        text = text.replace(k, v)
    (tmp_path / "project.yml").write_text(text)
    nvflare = str(BIN / "nvflare")
    _run([nvflare, "poc", "prepare", "-i", "project.yml", "--force"], env, tmp_path)
    prod = tmp_path / "poc" / "aligned_poc" / "prod_00"
    # After the workflow ends the server waits for the dead site's heartbeat timeout (600 s by default);
    # 40 s is four of a live site's 10 s heartbeats.
    fed = prod / "server" / "startup" / "fed_server.json"
    conf = json.loads(fed.read_text())
    conf["servers"][0]["heart_beat_timeout"] = 40
    fed.write_text(json.dumps(conf, indent=2))
    log = tmp_path / "log"
    try:
        _run([nvflare, "poc", "start", "-ex", "admin@nvidia.com", "--timeout", "300"], env, tmp_path)
        _run([sys.executable, str(JOB / "job.py"), "--export", "jobs", "--sites", "3", "--min-clients", "2",
              "--rounds", "4", "--train-timeout", "60", "--train-delay", "3", "--log", str(log)], env, tmp_path)
        out = _run([nvflare, "job", "submit", "-j", "jobs/aligned_digits"], env, tmp_path)
        job_id = re.search(r"job_id:\s*(\S+)", out).group(1)
        site3 = log / "site-3.jsonl"
        deadline = time.monotonic() + 900
        while not (site3.exists() and any(json.loads(x)["round"] == 1 for x in site3.read_text().splitlines())):
            assert time.monotonic() < deadline, "site-3 never received its round-2 task"
            time.sleep(0.2)
        assert _kill_site(prod, "site-3") >= 2
        waited = subprocess.run([nvflare, "job", "wait", job_id, "--timeout", "1500"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1600)
        _run([nvflare, "job", "download", job_id, "-o", "result", "--force"], env, tmp_path)
    finally:
        subprocess.run([nvflare, "poc", "stop"], cwd=tmp_path, env=env, capture_output=True, timeout=300)
    history = json.loads((tmp_path / "result" / job_id / "workspace" / "aligned_history.json").read_text())
    assert "COMPLETED" in waited.stdout, waited.stdout + waited.stderr
    records = site_records(log)
    check_history(history, records, 4, {"site-1": 1, "site-2": 2, "site-3": 3}, lost={"site-3": 1})
    assert history["0"]["dropouts"] == []
    assert history["1"]["dropouts"] == ["site-3"] and "site-3" not in history["1"]["received"]
    for r in range(1, 4):                               # the others go on; site-3 never comes back
        assert {"site-1", "site-2"} <= set(history[str(r)]["received"]), history[str(r)]
        assert "site-3" not in history[str(r)]["received"]
    assert history["3"]["central"]["accuracy"] > history["-1"]["central"]["accuracy"] + 0.3
    for _ in range(120):                                # poc stop may take a moment to end everything
        left = _processes(str(prod))
        if not left:
            break
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()) for p in left]


def test_replies_of_another_round_or_an_unknown_params_type_are_errors_and_diffs_are_marked():
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from alignment_solver.integrations.nvflare import AlignedController

    c = AlignedController(num_experts=2, initial_model="digits_task:initial_model", state_path="")
    c._round = 3
    c._collect(FLModel(params_type=ParamsType.FULL, params={"a": np.ones(1)}, current_round=2, meta={"client_name": "s1"}))
    c._collect(FLModel(params_type=ParamsType.DIFF, params={"a": np.ones(1)}, current_round=3, meta={"client_name": "s2"}))
    odd = FLModel(params={"a": np.ones(1)}, meta={"client_name": "s3"})
    odd.params_type = "WEIGHTS_AND_BIASES"                 # what a hostile or broken site could deserialise
    c._collect(odd)
    c._collect(FLModel(params={"a": np.ones(1)}, meta={"client_name": "s4"}))
    r1, r2, r3, r4 = c._replies
    assert r1.error == "a reply for round 2, received in round 3"
    assert r2.error is None and r2.diff
    assert "params_type must be FULL or DIFF" in r3.error
    assert r4.error is None and not r4.diff


def test_privacy_floor_holds_back_experts_whose_sites_dropped(monkeypatch):
    """Through the controller's own aggregation step: a planned site sends nothing; each expert
    left with fewer than min_group accepted replies keeps its arrays, and the history says so."""
    from alignment_solver.integrations.nvflare import AlignedController
    from alignment_solver.integrations.replies import Reply

    monkeypatch.syspath_prepend(str(JOB))
    c = AlignedController(num_experts=4, initial_model="digits_task:initial_model", state_path="", history_path="",
                          model_path="", aggregation_config={"min_group": 2},
                          coordinator_config={"capacity": {"default_capacity": 2, "max_capacity": 2}})
    monkeypatch.setattr(c, "info", lambda msg: None)
    warnings = []
    monkeypatch.setattr(c, "warning", warnings.append)
    c._setup()
    sites = [f"site-{i}" for i in range(1, 6)]
    plan = c.coordinator.plan_round(0, sites)
    planned = {str(pc.client_id): [int(e) for e in pc.experts] for pc in plan.clients if pc.experts}
    c.history[0] = {"plan": planned}
    before = {k: v.copy() for k, v in c.current.items()}
    dropped = sites[0]
    replies = []
    for site, experts in planned.items():
        if site == dropped:
            continue
        arrays = {k: v + 1.0 for k, v in before.items() if c.expert_of(k) is None or c.expert_of(k) in experts}
        metrics = {"num-examples": 20, "experts": experts, "expert-samples": [10] * len(experts),
                   "expert-loss": [0.5] * len(experts), "expert-accuracy": [0.8] * len(experts), "train-seconds": 1.0}
        replies.append(Reply(site, arrays=arrays, metrics=metrics))
    c._aggregate_round(0, replies, planned)
    senders = {j: sum(j in e for s, e in planned.items() if s != dropped) for j in range(4)}
    held = {j for j, n in senders.items() if 0 < n < 2}
    assert held, (planned, senders)                       # the dropout left some expert below the floor
    assert c.history[0]["held_back"]["experts"] == {j: senders[j] for j in held}
    for k, v in c.current.items():
        j = c.expert_of(k)
        moved = not np.allclose(v, before[k])
        assert moved == (j is None or senders[j] >= 2), (k, j, senders)
    assert any("privacy floor 2" in w for w in warnings)
    assert dropped in c.history[0]["dropouts"]


# ---- fused expert tensors (transformers 5 layout) ------------------------------------------------
FUSED = [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("gate_up_proj", "down_proj")]
CENTRAL_SEEN: list[dict] = []


def mixtral_model(num_experts: int, H: int = 8, inner: int = 6, vocab: int = 16) -> dict:
    """Arrays shaped like a transformers-5 Mixtral with 2 MoE layers (``initial_model`` hook)."""
    shapes = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"})
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate.weight": (num_experts, H),
                       p + "mlp.experts.gate_up_proj": (num_experts, 2 * inner, H),
                       p + "mlp.experts.down_proj": (num_experts, H, inner)})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (vocab, H)})
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}


def central(arrays: dict) -> dict:
    """``central_evaluation`` hook: records what the server scored."""
    CENTRAL_SEEN.append({k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()})
    return {"accuracy": 0.5}


class FakeSites:
    """Stands in for NVFlare's task machinery: each site answers at once (train: every array + 1,
    or the exception of ``fail``), and records what it received."""

    def __init__(self, controller, sites, fail=None):
        self.c, self.sites, self.fail = controller, sites, fail
        self.train: dict[int, dict[str, FLModelT]] = {}
        self.evaluated: dict[int, dict[str, dict]] = {}

    def send_model(self, task_name, data, targets, timeout, callback):
        from alignment_solver.integrations.nvflare import error_model

        (site,) = targets
        self.train.setdefault(data.current_round, {})[site] = data
        if self.fail is not None:
            reply = error_model(self.fail)
        else:
            experts = data.meta["experts"]
            reply = FLModelT(params={k: v + 1.0 for k, v in data.params.items()}, current_round=data.current_round,
                             metrics={"num-examples": 20, "experts": experts, "expert-samples": [10] * len(experts),
                                      "expert-loss": [0.5] * len(experts), "expert-accuracy": [0.8] * len(experts)})
        reply.meta = {**(reply.meta or {}), "client_name": site}
        callback(reply)

    def send_model_and_wait(self, task_name, data, targets, timeout):
        assert task_name == "validate"
        self.evaluated[data.current_round] = {s: data.params for s in targets}
        return [FLModelT(params={}, metrics={"num-examples": 10, "accuracy": 0.5, "loss": 1.0},
                         meta={"client_name": s}) for s in targets]


try:
    from nvflare.app_common.abstract.fl_model import FLModel as FLModelT
except ImportError:                                   # the module is skipped without nvflare
    FLModelT = None


def controller(monkeypatch, tmp_path, sites, fail=None, **kw):
    from nvflare.apis.signal import Signal

    from alignment_solver.integrations.nvflare import AlignedController

    c = AlignedController(num_experts=4, initial_model=f"{__name__}:mixtral_model", central_evaluation=f"{__name__}:central",
                          query_timeout=0, coordinator_config={"capacity": {"default_capacity": 1, "max_capacity": 1}},
                          **kw)
    fake = FakeSites(c, sites, fail)
    logs = {"info": [], "warning": [], "error": []}
    for level in logs:
        monkeypatch.setattr(c, level, logs[level].append)
    monkeypatch.setattr(c, "send_model", fake.send_model)
    monkeypatch.setattr(c, "send_model_and_wait", fake.send_model_and_wait)
    monkeypatch.setattr(c, "_wait_for_tasks", lambda: None)
    monkeypatch.setattr(c, "_connected", lambda: list(sites))
    monkeypatch.setattr(c, "get_run_dir", lambda: str(tmp_path))
    c.abort_signal = Signal()
    return c, fake, logs


def test_fused_experts_travel_as_slices_and_the_workflow_hands_out_the_joined_model(monkeypatch, tmp_path):
    """The whole workflow (run) on fake sites: each site gets exactly its slices (bytes counted per
    slice), unassigned slices stay unchanged, and validate tasks, central_evaluation and model_path
    see the full fused model in float32; evaluation runs in the last round only."""
    CENTRAL_SEEN.clear()
    sites = ["site-1", "site-2"]
    c, fake, logs = controller(monkeypatch, tmp_path, sites, num_rounds=3)
    full = mixtral_model(4)
    c.run()
    assert any("4 units (expert), 2 MoE layer(s), 17 shared arrays, 4 fused parameters split by expert" in m
               for m in logs["info"]), logs["info"]
    shared = [k for k in full if k not in FUSED]
    expected = {k: v.copy() for k, v in full.items()}
    for r in range(3):
        h = c.history[r]
        sent = 0
        for site, data in fake.train[r].items():
            experts = data.meta["experts"]
            assert data.meta["num-experts"] == 4 and data.meta["units"] == "expert" and data.meta["round"] == r
            want = {**{k: expected[k] for k in shared},
                    **{f"{k}[{j}]": expected[k][j] for k in FUSED for j in experts}}
            assert set(data.params) == set(want), (r, site)
            for k, v in want.items():
                assert data.params[k].dtype == np.float32 and np.array_equal(data.params[k], v), (r, site, k)
            sent += sum(v.nbytes for v in want.values())
        assert h["bytes_down"] == sent == h["bytes_up"], (r, h)
        trained = {j for d in fake.train[r].values() for j in d.meta["experts"]}
        assert 0 < len(trained) < 4 and h["trained_experts"] == sorted(trained)
        assert len(fake.train[r]) == 2
        for k in shared:                             # the mean of the two sites' (value + 1)
            expected[k] = expected[k] + np.float32(1.0)
        for k in FUSED:                              # the next round delivers these bit for bit: a slice
            for j in trained:                        # nobody was assigned kept its value
                expected[k][j] = expected[k][j] + np.float32(1.0)
        assert h["eval_bytes_down"] == (sum(v.nbytes for v in full.values()) * 2 if r == 2 else 0), (r, h)
        assert h["eval_bytes_up"] == 0
    assert sorted(fake.evaluated) == [2]
    assert set(fake.evaluated[2]["site-1"]) == set(full)
    assert all(seen == {k: (v.shape, "float32") for k, v in full.items()} for seen in CENTRAL_SEEN)
    assert len(CENTRAL_SEEN) == 4                    # before round 0 and after each round
    with np.load(tmp_path / "aligned_model.npz") as npz:
        final = dict(npz)
    assert list(final) == list(full)
    for k, v in final.items():
        assert v.dtype == np.float32 and np.array_equal(v, expected[k]), k
        assert np.array_equal(c.full_model()[k], v), k


def test_the_controller_sends_declared_expert_axes_and_refuses_bad_ones(monkeypatch, tmp_path):
    from alignment_solver.integrations.nvflare import AlignedController

    c, fake, _ = controller(monkeypatch, tmp_path, ["site-1"], num_rounds=1,
                            expert_axes={r"mlp\.experts\.(gate_up|down)_proj$": 0})
    c.run()
    assert fake.train[0]["site-1"].meta["expert-axes"] == {r"mlp\.experts\.(gate_up|down)_proj$": 0}
    with pytest.raises(ValueError, match="is not a regular expression"):
        AlignedController(num_experts=4, initial_model="x:y", expert_axes={"(": 0})
    with pytest.raises(ValueError, match="expert_axes must be a dict"):
        AlignedController(num_experts=4, initial_model="x:y", expert_axes=[0])


def test_evaluation_every_n_rounds_on_a_fraction_of_the_sites(monkeypatch, tmp_path):
    sites = [f"site-{i}" for i in range(1, 5)]
    c, fake, _ = controller(monkeypatch, tmp_path, sites, num_rounds=5, evaluate_every=2, fraction_evaluate=0.5)
    c.run()
    assert sorted(fake.evaluated) == [1, 3, 4]       # rounds 2, 4 and the last (0-based 1, 3, 4)
    assert all(len(targets) == 2 for targets in fake.evaluated.values())
    full = sum(v.nbytes for v in mixtral_model(4).values())
    assert [c.history[r]["eval_bytes_down"] // full for r in range(5)] == [0, 2, 0, 2, 2]


# ---- no silent success ----------------------------------------------------------------------------
def test_the_workflow_stops_after_max_failed_rounds_with_the_sites_reason(monkeypatch, tmp_path):
    from alignment_solver.integrations.nvflare import TrainingFailedError

    reason = ValueError("MoE layer 'blocks.0.moe' routed 256 samples but the batch has 32")
    c, fake, logs = controller(monkeypatch, tmp_path, ["site-1", "site-2"], fail=reason, num_rounds=10)
    with pytest.raises(TrainingFailedError, match=r"no valid training reply in 3 consecutive round\(s\) \(rounds 0 to 2; "
                       r"max_failed_rounds=3\); the most frequent reason \(6 of 6 planned site-rounds\): replied with "
                       r"an error: ValueError: MoE layer 'blocks.0.moe' routed 256 samples"):
        c.run()
    assert sorted(c.history) == [-1, 0, 1, 2]
    assert any("stopping: no valid training reply" in m for m in logs["error"])
    assert json.loads((tmp_path / "aligned_history.json").read_text())["2"]["dropouts"] == ["site-1", "site-2"]


def test_failed_nvflare_tasks_and_silence_are_named_too(monkeypatch, tmp_path):
    from alignment_solver.integrations.nvflare import TrainingFailedError

    c, _, _ = controller(monkeypatch, tmp_path, ["site-1", "site-2"], num_rounds=2, max_failed_rounds=5)
    c._setup()
    planned = {"site-1": [0], "site-2": [1]}
    c.coordinator.plan_round(0, list(planned))
    c.history[0] = {"plan": planned}
    c._aggregate_round(0, [], planned, {"site-1": "EXECUTION_EXCEPTION"})
    c.coordinator.plan_round(1, list(planned))
    c.history[1] = {"plan": planned}
    with pytest.raises(TrainingFailedError, match=r"the most frequent reason \(2 of 4 planned site-rounds\): its train "
                       r"task failed on the site: EXECUTION_EXCEPTION"):
        c._aggregate_round(1, [], planned, {"site-1": "EXECUTION_EXCEPTION"})   # every round of the run failed
    assert c.failed[0][1] == ["its train task failed on the site: EXECUTION_EXCEPTION (the exception is in the site's "
                              "log)", "sent no reply within train_timeout=600 s"]


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["error_model", "script-crashes"])
def test_simulator_run_whose_sites_all_fail_stops_with_their_reason(tmp_path, crash):
    """Every site's training raises: the workflow raises after max_failed_rounds=2, NVFlare panics
    and the simulator exits with status 2; the server log names the reason (the exception itself
    when the site answers with error_model, NVFlare's return code when the script dies)."""
    script = f"""
import sys
from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
from alignment_solver.integrations.nvflare import AlignedController
job = FedJob(name="failing", min_clients=2)
job.set_app_packages(["alignment_solver"])
job.to_server(AlignedController(num_experts=4, num_rounds=5, initial_model="digits_task:initial_model", min_clients=2,
                                train_timeout=120, evaluate_timeout=30, max_failed_rounds=2))
job.to_server({str(JOB / "digits_task.py")!r})
job.to_clients(ScriptRunner(script={str(ROOT / "tests" / "nvflare_failing_client.py")!r},
                            script_args="--sites 2 --experts 4{' --crash' if crash else ''}",
                            framework=FrameworkType.NUMPY))
job.to_clients({str(JOB / "digits_task.py")!r})
sys.exit(job.simulator_run({str(tmp_path / "sim")!r}, n_clients=2, threads=2))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    reason = "its train task failed on the site: " if crash else \
        "replied with an error: ValueError: MoE layer 'blocks.0.moe' routed 256 samples but the batch has 32"
    assert "stopping: no valid training reply in 2 consecutive round(s) (rounds 0 to 1; max_failed_rounds=2)" in out
    assert re.search(r"Aborting current RUN due to FATAL_SYSTEM_ERROR received: .*TrainingFailedError: .*"
                     + re.escape(reason), out), out[-4000:]
    history = json.loads((tmp_path / "sim" / "server" / "simulate_job" / "aligned_history.json").read_text())
    assert sorted(history) == ["0", "1"], history
