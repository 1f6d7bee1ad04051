"""Running a Flower app with ``flwr run`` on a local simulation SuperLink that the caller starts,
and stops, itself: the process handling shared by the examples' ``run.py`` scripts.

A ``run.py`` puts this folder (``examples/``) on ``sys.path`` and imports from here:

- :func:`flower_env` writes Flower's configuration (``$FLWR_HOME/config.toml``: one connection to
  the ``:local:`` SuperLink) and returns the environment for the commands, with free ports in
  ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT`` unless they are set;
- :func:`start_superlink` starts ``flower-superlink --simulation`` on those ports and waits until it
  answers (otherwise ``flwr run`` would start a SuperLink of its own, which outlives it);
- :func:`flwr_run` submits the app (``flwr run APP CONNECTION --stream --federation-config
  "num-supernodes=N" --run-config ...``) and echoes its progress lines;
- :func:`stop_all` stops everything :func:`start` started, by process id and that process's group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

STARTED: list[subprocess.Popen] = []          # every process started here, stopped by stop_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so stopping it stops its children), output to ``log``."""
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the process and its group (by id), SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    try:                                      # children left behind in the group (Ray workers and the like)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for proc in STARTED:
        stop(proc)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that the caller's ``finally: stop_all()`` runs."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)


class Tail:
    """Echoes the new progress lines of a log: those containing ``marker``, from ``start`` (default:
    ``marker``) on, after ``label``."""

    def __init__(self, log: Path, marker: str, label: str = "", start: str = "") -> None:
        self.log, self.marker, self.label, self.start, self.seen = log, marker, label, start or marker, 0

    def echo(self) -> None:
        if not self.log.exists():
            return
        lines = self.log.read_text(errors="replace").splitlines()
        for line in lines[self.seen:]:
            if self.marker in line:
                cut = line.find(self.start)
                print("  " + self.label + line[max(cut, 0):], flush=True)
        self.seen = len(lines)


def follow(proc: subprocess.Popen, tail: Tail, timeout: float, others: tuple[Tail, ...] = ()) -> int:
    """Wait for ``proc`` (stopped after ``timeout`` seconds), echoing its progress and that of ``others``."""
    deadline = time.time() + timeout
    while True:
        done = proc.poll() is not None
        for t in (tail, *others):
            t.echo()
        if done:
            return proc.returncode
        if time.time() > deadline:
            stop(proc)
            raise SystemExit(f"{proc.args[:3]} did not finish within {timeout:.0f} s; see {tail.log}")
        time.sleep(1.0)


def flower_config(home: Path, connection: str) -> None:
    """Flower's own configuration: one connection, ``connection``, to the local simulation SuperLink.
    (Flower 1.42 keeps connections here, not in the app's pyproject.toml: ``flwr run`` moves a
    ``[tool.flwr.federations]`` table it finds there and comments it out in the file.)"""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n\n'
                                      f'[superlink.{connection}]\naddress = ":local:"\n')


def flower_env(out: Path, connection: str, pythonpath: tuple[Path, ...] = ()) -> dict:
    """The environment for ``flower-superlink`` and ``flwr``: this interpreter's bin first on PATH,
    ``FLWR_HOME`` in ``out/.flwr`` (with :func:`flower_config`), no runtime dependency installation,
    the local SuperLink's ports (free ones unless set) and ``pythonpath`` first on PYTHONPATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(out / ".flwr"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DEDUP_LOGS": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port())),
           "FLWR_LOCAL_CONTROL_API_PORT": os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*map(str, pythonpath), os.environ.get("PYTHONPATH", "")) if p)
    flower_config(out / ".flwr", connection)
    return env


def start_superlink(env: dict, log: Path, wait: float = 120.0) -> subprocess.Popen:
    """``flower-superlink --simulation`` on the ports in ``env``, once it answers on its health endpoint."""
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    superlink = start(["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                       "--host", "127.0.0.1", "--port", port,
                       "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}"], env, log)
    print(f"flower-superlink started (pid {superlink.pid}), waiting for it on 127.0.0.1:{port}", flush=True)
    deadline = time.time() + wait
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return superlink
        except OSError:
            if superlink.poll() is not None:
                raise SystemExit(f"flower-superlink exited ({superlink.returncode}); see {log}") from None
            if time.time() > deadline:
                stop(superlink)
                raise SystemExit(f"flower-superlink did not answer on 127.0.0.1:{port} within {wait:.0f} s") from None
            time.sleep(0.5)


def run_config(values: dict) -> str:
    """``--run-config`` text: strings quoted, numbers as they are."""
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def flwr_run(app: Path, connection: str, nodes: int, config: dict, env: dict, log: Path, tail: Tail,
             timeout: float, others: tuple[Tail, ...] = ()) -> int:
    """``flwr run`` the app on ``nodes`` simulated nodes (one CPU each), echoing ``tail``'s progress
    lines; returns flwr's exit code, which is 0 even when the run failed: check the app's output."""
    proc = start(["flwr", "run", str(app), connection, "--stream", "--run-config", run_config(config),
                  "--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"], env, log)
    return follow(proc, tail, timeout, others)


def run_strategies(app: Path, connection: str, strategies: list[str], config: Callable[[str, Path], dict], out: Path,
                   env: dict, nodes: int, timeout: float, done: Callable[[dict], bool] = bool,
                   others: tuple[Tail, ...] = ()) -> dict[str, dict]:
    """Start a SuperLink, ``flwr run`` the app once per strategy (``config(strategy, result_file)`` is
    its run config; the ServerApp writes ``result_file``), stop the SuperLink.  Returns each
    strategy's result with its ``wall_seconds``; SystemExit with the log's tail when a run wrote
    no result ``done`` accepts (flwr exits 0 even when the run failed)."""
    superlink = start_superlink(env, out / "superlink.log")
    runs = {}
    try:
        for strategy in strategies:
            result = out / f"{strategy}.json"
            result.unlink(missing_ok=True)
            started = time.time()
            log = out / f"flwr-{strategy}.log"
            code = flwr_run(app, connection, nodes, config(strategy, result), env, log, Tail(log, f"[{strategy}]"),
                            timeout, others)
            data = json.loads(result.read_text()) if result.exists() else {}
            if code != 0 or not done(data):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                raise SystemExit(f"the {strategy} run failed (flwr exit {code}, no result in {result}):\n{tail}")
            data["wall_seconds"] = time.time() - started
            runs[strategy] = data
            print(f"flwr run {strategy}: done in {data['wall_seconds']:.0f} s", flush=True)
    finally:
        stop(superlink)
        print(f"flower-superlink (pid {superlink.pid}) stopped", flush=True)
    return runs
