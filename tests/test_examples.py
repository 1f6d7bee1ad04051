"""The recipes in examples/*/README.md, run exactly as written (each bash block as one script)."""

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

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(readme: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_block(block: str, tmp_path: Path, env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run ``block`` from a copy of the repository root's view (cwd = repo root, outputs in tmp)."""
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\n" + block)
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # anything the recipe left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture
def workdir(tmp_path):
    """An empty folder with the repository's examples/ linked in, so outputs stay out of the clone."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def flower_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PORT": str(free_port()), "RAY_DEDUP_LOGS": "0"}


needs_flower = pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs the flower extra")


@needs_flower
@pytest.mark.parametrize("which, history", [(0, "flower-simulation.json"), (1, "flower-deployment.json")])
def test_flower_app_readme_recipe(workdir, which, history):
    blocks = bash_blocks(ROOT / "examples" / "flower_app" / "README.md")
    assert len(blocks) == 2
    proc = run_block(blocks[which], workdir, flower_env())
    assert proc.returncode == 0, proc.stdout[-4000:]
    data = json.loads((workdir / history).read_text())
    rounds = [int(r) for r in data]
    assert rounds == [0, 1, 2, 3], rounds
    assert all(data[str(r)]["received"] and data[str(r)]["changed_experts"] == data[str(r)]["trained_experts"]
               for r in (1, 2, 3))
    assert data["3"]["central_accuracy"] > data["0"]["central_accuracy"] + 0.3
    assert "license" not in proc.stdout.lower() or "missing" not in proc.stdout.lower()
    for _ in range(120):                               # what the recipe stopped may take a moment to exit
        leftovers = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True).stdout
        if not leftovers:
            break
        time.sleep(0.5)
    assert not leftovers, leftovers


needs_nvflare = pytest.mark.skipif(importlib.util.find_spec("nvflare") is None, reason="needs the nvflare extra")


@needs_nvflare
@pytest.mark.parametrize("which", [0, 1], ids=["simulator", "poc"])
def test_nvflare_job_readme_recipe(workdir, which):
    blocks = bash_blocks(ROOT / "examples" / "nvflare_job" / "README.md")
    assert len(blocks) == 2
    (workdir / "home").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(workdir / "home"), "FED_PORT": str(free_port()), "ADMIN_PORT": str(free_port())}
    proc = run_block(blocks[which], workdir, env, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    found = list(workdir.glob("nvflare-sim/server/simulate_job/aligned_history.json" if which == 0
                              else "nvflare-result/*/workspace/aligned_history.json"))
    assert len(found) == 1, proc.stdout[-4000:]
    history = json.loads(found[0].read_text())
    assert [int(r) for r in history] == [-1, 0, 1, 2]
    assert all(h["received"] and not h["dropouts"] and h["changed_experts"] == h["trained_experts"]
               for r, h in history.items() if r != "-1")
    assert history["2"]["central"]["accuracy"] > history["-1"]["central"]["accuracy"] + 0.3
    assert "'-1': {'accuracy'" in proc.stdout                 # the recipe's last line printed the curve
    if which == 1:
        for _ in range(120):
            left = subprocess.run(["pgrep", "-af", str(workdir / "nvflare-poc")], capture_output=True,
                                  text=True).stdout
            if not left:
                break
            time.sleep(0.5)
        assert not left, left


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs the torch extra")


@needs_flower
@needs_torch
def test_flower_torch_readme_compares_aligned_with_fedavg(workdir):
    """Both strategies run through `flwr run` on the SuperLink run.py starts (and stops: nothing is left
    on its control port); every node gets the shared arrays and exactly its experts in both blocks."""
    blocks = bash_blocks(ROOT / "examples" / "flower_torch" / "README.md")
    assert len(blocks) == 2
    env = flower_env()
    proc = run_block(blocks[0], workdir, env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "| round | aligned accuracy | fedavg accuracy |" in proc.stdout
    out = workdir / "runs" / "flower_torch"
    assert (out / ".flwr" / "config.toml").exists() and "flower-superlink" in proc.stdout
    for _ in range(60):                               # run.py's SuperLink runs in its own session: gone by now
        leftovers = subprocess.run(["pgrep", "-af", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}"],
                                   capture_output=True, text=True).stdout
        if not leftovers:
            break
        time.sleep(0.5)
    assert not leftovers, leftovers
    aligned = json.loads((out / "aligned.json").read_text())["history"]
    fedavg = json.loads((out / "fedavg.json").read_text())["history"]
    assert (out / "accuracy.png").stat().st_size > 0
    per_expert = 8                                  # keys of one expert: two Linear layers in each of two blocks
    shared = 8                                      # embed, two routers, head: weight and bias each
    mb = {"aligned": 0, "fedavg": 0}
    for r in range(1, 11):
        h = aligned[str(r)]
        assert h["plan"] and not h["rejected"] and not h["dropouts"], (r, h)
        assert h["changed_experts"] == h["trained_experts"]
        for node, got in h["received"].items():
            plan = h["plan"][node]
            assert got["experts"] == plan["experts"] and 1 <= len(plan["experts"]) <= plan["capacity"]
            assert len(got["keys"]) == shared + per_expert * len(plan["experts"])
            assert {k.split(".")[1] for k in got["keys"] if ".experts." in k} == {"0", "1"}    # both blocks
            assert plan["label"].startswith("partition-")
        for name, hist in (("aligned", aligned), ("fedavg", fedavg)):
            mb[name] += hist[str(r)]["bytes_down"] + hist[str(r)]["bytes_up"]
    assert mb["aligned"] < 0.6 * mb["fedavg"], mb
    assert {aligned["1"]["plan"][n]["capacity"] for n in aligned["1"]["plan"]} == {1, 2, 3}   # declared in round 1
    assert aligned["10"]["central_accuracy"] > aligned["0"]["central_accuracy"] + 0.2


@needs_nvflare
@needs_torch
def test_flower_torch_model_through_the_nvflare_simulator(workdir):
    blocks = bash_blocks(ROOT / "examples" / "flower_torch" / "README.md")
    (workdir / "home").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(workdir / "home")}
    proc = run_block(blocks[1], workdir, env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    history = json.loads((workdir / "nvflare-torch/server/simulate_job/aligned_history.json").read_text())
    assert [int(r) for r in history] == [-1, 0, 1, 2]
    for r in ("0", "1", "2"):
        h = history[r]
        assert h["received"] == h["plan"] and not h["dropouts"] and not h["rejected"], (r, h)
        assert h["changed_experts"] == h["trained_experts"]
        for site, units in h["plan"].items():       # per-layer units: at least one expert of each block
            assert {u // 8 for u in units} == {0, 1} and max(len([u for u in units if u // 8 == b])
                                                             for b in (0, 1)) <= h["capacity"][site]
    assert history["0"]["capacity"] == {"site-1": 1, "site-2": 2, "site-3": 3, "site-4": 1}
    assert history["2"]["central"]["accuracy"] > history["-1"]["central"]["accuracy"] + 0.1


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers 5 (the hf extra)")


@needs_flower
@needs_torch
@needs_nvflare
@needs_transformers
def test_hf_moe_readme_aligned_fedavg_and_nvflare(workdir):
    """The tiny transformers-5 Mixtral through `flwr run` (aligned and FedAvg) and the NVFlare simulator:
    both strategies end with the full model, above chance; every aligned node gets the shared arrays and
    only its experts' slices of the fused expert tensors, and the byte counts add up."""
    import math

    readme = ROOT / "examples" / "hf_moe" / "README.md"
    glue = re.findall(r"- `([\w/]+\.py)`: \*\*(\d+)\*\* lines", readme.read_text())
    assert [name for name, _ in glue] == ["hf_moe/client_app.py", "hf_moe/server_app.py", "nvflare_client.py",
                                          "nvflare_job.py"], glue
    for name, count in glue:
        marked = [line for line in (ROOT / "examples" / "hf_moe" / name).read_text().splitlines()
                  if line.rstrip().endswith("# aligned")]
        assert len(marked) == int(count), (name, len(marked), count)
    blocks = bash_blocks(readme)
    assert len(blocks) == 1
    (workdir / "home").mkdir()
    env = {**flower_env(), "HOME": str(workdir / "home")}
    proc = run_block(blocks[0], workdir, env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "| round | aligned accuracy | fedavg accuracy | nvflare aligned accuracy |" in proc.stdout
    out = workdir / "runs" / "hf_moe"
    assert (out / "accuracy.png").stat().st_size > 0
    chance = 1 / 60
    runs = {s: json.loads((out / f"{s}.json").read_text()) for s in ("aligned", "fedavg")}
    shapes = runs["aligned"]["final_model"]["keys"]
    fused = sorted(k for k in shapes if ".experts." in k)
    assert fused == [f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 1) for p in ("down_proj", "gate_up_proj")]
    shared = sorted(k for k in shapes if k not in fused)
    assert len(shared) == 17 and all(shapes[k][0] == 8 for k in fused)
    size = {k: 4 * math.prod(s) for k, s in shapes.items()}
    shared_bytes, slice_bytes = sum(size[k] for k in shared), sum(size[k] // 8 for k in fused)
    rounds = runs["aligned"]["rounds"]
    for s, data in runs.items():                      # the full model, float32, trained, above chance
        final = data["final_model"]
        assert final["keys"] == shapes and final["dtypes"] == ["float32"] and final["finite"], s
        assert set(fused) <= set(final["changed"]), (s, final["changed"])
        h = data["history"]
        assert h[str(rounds)]["central_accuracy"] > max(3 * chance, h["0"]["central_accuracy"] + 0.1), (s, h)
        for r in range(1, rounds + 1):
            m = h[str(r)]["measured"]
            assert {"train_down", "train_up", "eval_down", "eval_up"} <= set(m), (s, r, m)
            assert sorted(h[str(r)]["node_views"]) == [f"partition-{p}" for p in range(4)], (s, r)
    # each aligned node's own model (shared arrays + its experts) learns its language; FedAvg's one model cannot yet
    assert runs["aligned"]["history"][str(rounds)]["node_view_accuracy"] > 0.6
    assert runs["aligned"]["history"][str(rounds)]["node_view_accuracy"] > \
        runs["fedavg"]["history"][str(rounds)]["node_view_accuracy"] + 0.2
    full = sum(size.values())
    trained_mb = {}
    for s, data in runs.items():
        trained_mb[s] = sum(data["history"][str(r)]["measured"]["train_down"]
                            + data["history"][str(r)]["measured"]["train_up"] for r in range(1, rounds + 1))
    header = (runs["fedavg"]["history"]["1"]["measured"]["train_down"] / 4 - full) / len(shapes)
    assert header == int(header) and 0 <= header <= 256, header           # Flower serialises each array (.npy)
    for r in range(1, rounds + 1):
        assert runs["fedavg"]["history"][str(r)]["measured"]["train_down"] == 4 * (full + header * len(shapes))
        assert runs["fedavg"]["history"][str(r)]["measured"]["eval_down"] > 0          # Flower's default: every node
        h = runs["aligned"]["history"][str(r)]
        assert h["plan"] and set(h["received"]) == set(h["plan"]) and not h["rejected"] and not h["dropouts"], (r, h)
        assert h["changed_experts"] == h["trained_experts"]
        expected = 0
        for node, got in h["received"].items():
            experts = h["plan"][node]["experts"]
            assert got["experts"] == experts and 1 <= len(experts) <= h["plan"][node]["capacity"] <= 3
            assert sorted(got["keys"]) == sorted(shared + [f"{k}[{e}]" for k in fused for e in experts]), (r, node)
            expected += shared_bytes + len(experts) * slice_bytes + header * len(got["keys"])
        assert h["bytes_down"] == h["measured"]["train_down"] == expected, (r, h["bytes_down"], expected)
        assert h["bytes_up"] == h["measured"]["train_up"] == expected
        assert (h["eval_bytes_down"], h["eval_bytes_up"]) == (h["measured"]["eval_down"], h["measured"]["eval_up"])
    assert trained_mb["aligned"] < 0.6 * trained_mb["fedavg"], trained_mb
    assert {n["capacity"] for n in runs["aligned"]["history"]["1"]["plan"].values()} == {2, 3}   # declared in round 1
    history = json.loads((out / "nvflare" / "server" / "simulate_job" / "aligned_history.json").read_text())
    assert [int(r) for r in history] == [-1] + list(range(rounds))
    assert history[str(rounds - 1)]["central"]["accuracy"] > max(3 * chance, history["-1"]["central"]["accuracy"] + 0.1)
    tasks = [json.loads(line) for f in sorted((out / "nvflare-sites").glob("site-*.jsonl")) for line in
             f.read_text().splitlines()]
    train = [t for t in tasks if t["task"] == "train"]
    assert len(train) == sum(len(history[str(r)]["plan"]) for r in range(rounds)) >= rounds
    for t in train:
        assert sorted(t["received"]) == sorted(shared + [f"{k}[{e}]" for k in fused for e in t["experts"]]), t
        assert t["bytes_down"] == t["bytes_up"] == shared_bytes + len(t["experts"]) * slice_bytes
        assert t["dtypes"] == ["float32"]
    for r in range(rounds):
        h = history[str(r)]
        assert h["received"] == h["plan"] and not h["dropouts"] and not h["rejected"], (r, h)
        mine = [t for t in tasks if t["round"] == r]          # the controller's byte counts match the sites' own
        assert h["bytes_down"] == h["bytes_up"] == sum(t["bytes_down"] for t in mine if t["task"] == "train") > 0
        assert h["eval_bytes_down"] == sum(t["bytes_down"] for t in mine if t["task"] == "evaluate")
    assert "training and" in (out / "results.md").read_text()
    for _ in range(120):                               # what run.py stopped may take a moment to exit
        leftovers = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True).stdout
        if not leftovers:
            break
        time.sleep(0.5)
    assert not leftovers, leftovers
