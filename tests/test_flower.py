"""The Flower plug-in on real Flower: the simulation engine, and a local deployment.

Both run the example app in examples/flower_app. The deployment test starts a SuperLink and
three SuperNodes on 127.0.0.1 (insecure, free ports), runs the app with `flwr run`, kills one
SuperNode during round 2, and stops every process it started.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("flwr") is None:     # checked without importing: gRPC must not load at collection
    pytest.skip("flwr is not installed (pip install 'alignment-solver[flower]')", allow_module_level=True)

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def check_rounds(history: dict, rounds: int) -> None:
    """Every node got exactly its planned experts, capacities held, only trained experts changed."""
    for r in range(1, rounds + 1):
        entry = history[str(r)]
        for node, planned in entry["plan"].items():
            assert len(planned["experts"]) <= planned["capacity"]
            if node in entry["received"]:
                got = entry["received"][node]
                assert got["experts"] == planned["experts"], (r, node)
                owners = {k.split(".")[0] for k in got["keys"]}
                assert owners == {"gate"} | {f"expert{e}" for e in planned["experts"]}, (r, node, owners)
        assert entry["changed_experts"] == entry["trained_experts"], r
    accuracy = [history[str(r)]["central_accuracy"] for r in range(rounds + 1)]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy


def test_simulation_engine_ten_nodes(tmp_path):
    out = tmp_path / "history.json"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(APP)!r})
        from flwr.simulation import run_simulation
        from flower_app.server_app import app as server
        from flower_app.client_app import app as client
        run_simulation(server_app=server, client_app=client, num_supernodes=10,
                       backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})
    """)
    env = {**os.environ, "FLOWER_APP_HISTORY": str(out), "FLOWER_APP_ROUNDS": "3", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(out.read_text())
    assert len(history["1"]["nodes"]) == 10
    check_rounds(history, 3)
    assert all(not history[str(r)]["dropouts"] for r in (1, 2, 3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_local_deployment_survives_a_lost_supernode(tmp_path):
    home = tmp_path / "flwr"
    home.mkdir()
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home)}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    procs = []

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        return procs[-1]

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{_free_port()}"],
              "superlink")
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        nodes = [start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(_free_port()),
                        "--node-config", f"partition-id={i} num-partitions=3"], f"supernode{i}") for i in range(3)]
        history_path = tmp_path / "history.json"
        run = start([str(BIN / "flwr"), "run", str(APP), "local-deployment", "--stream", "--run-config",
                     f"history-path='{history_path}' num-server-rounds=4 train-delay=2.0 min-nodes=3 "
                     f"round-timeout=15.0"], "flwr-run")
        killed = None
        started = time.time()
        while run.poll() is None and time.time() - started < 600:
            time.sleep(0.5)
            if killed is None and history_path.exists():
                history = json.loads(history_path.read_text())
                if "evaluate" in history.get("1", {}):
                    time.sleep(1.0)                 # round 2 training is under way (2 s per node)
                    os.killpg(nodes[2].pid, signal.SIGKILL)
                    killed = time.time() - started
        assert run.returncode == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
        assert killed is not None
        history = json.loads(history_path.read_text())
        check_rounds(history, 4)
        lost = [history[str(r)]["dropouts"] for r in (2, 3, 4)]
        assert any(lost), lost                      # the killed node was planned and counted as a dropout
        assert all(history[str(r)]["received"] for r in (2, 3, 4))
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)
