"""search.yml machinery: nnictl create --foreground on a free port, pinned to 127.0.0.1, checked outcome."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from search_space.genotype import Genotype
from strategies.nni_local import (PRELOAD, _problems, bind_hosts, experiment_summary, free_port, listening_addresses,
                                  localhost_env)

REPO = Path(__file__).resolve().parents[2]
NNICTL = Path(sys.executable).parent / "nnictl"
NODE = None
try:
    import nni_node

    NODE = Path(nni_node.__path__[0]) / "node"
except ImportError:  # pragma: no cover
    pass

needs_nnictl = pytest.mark.skipif(not (NNICTL.is_file() or shutil.which("nnictl")), reason="nnictl is not installed")


def ss_listeners(port: int) -> list[str]:
    """Local addresses listening on ``port`` according to `ss -ltn` (independent of /proc parsing)."""
    if not shutil.which("ss"):
        return []
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(NODE is None or not NODE.is_file(), reason="NNI's bundled node is missing")
def test_preload_pins_listeners_and_tensorboard(tmp_path):
    script = tmp_path / "probe.js"
    script.write_text(
        "const http = require('http'); const cp = require('child_process');\n"
        "const out = [];\n"
        "const a = http.createServer(); a.listen(0, '0.0.0.0', () => {\n"
        "  out.push(a.address().address);\n"
        "  const b = http.createServer(); b.listen({port: 0}, () => {\n"
        "    out.push(b.address().address);\n"
        "    const tb = cp.execSync('echo tensorboard --bind_all --logdir_spec=x').toString().trim();\n"
        "    console.log(JSON.stringify({addresses: out, tb})); a.close(); b.close(); });\n"
        "});\n")
    done = subprocess.run([str(NODE), str(script)], env=localhost_env(), capture_output=True, text=True, timeout=60)
    probe = json.loads(done.stdout)
    assert probe["addresses"] == ["127.0.0.1", "127.0.0.1"]
    assert probe["tb"] == "tensorboard --host=127.0.0.1 --logdir_spec=x"
    assert str(PRELOAD) in localhost_env()["NODE_OPTIONS"]


@pytest.mark.skipif(NODE is None or not NODE.is_file(), reason="NNI's bundled node is missing")
def test_preload_mirrors_a_server_onto_each_listed_address(tmp_path):
    """PAIF_BIND_HOST="127.0.0.1,127.0.0.2" (a remote sweep's manager: loopback + nniManagerIp): one HTTP server
    answers on both addresses, on the same port, and on no other interface."""
    script = tmp_path / "mirror.js"
    script.write_text(
        "const http = require('http');\n"
        "const s = http.createServer((req, res) => res.end('pong ' + req.url));\n"
        "s.listen(0, () => { console.log(JSON.stringify({port: s.address().port}));\n"
        "  process.stdin.on('data', () => { s.close(); process.exit(0); }); });\n")
    env = localhost_env(hosts=["127.0.0.1", "127.0.0.2"])
    assert env["PAIF_BIND_HOST"] == "127.0.0.1,127.0.0.2"
    proc = subprocess.Popen([str(NODE), str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        deadline = time.monotonic() + 10
        while len(listening_addresses(port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listening_addresses(port) == {"127.0.0.1", "127.0.0.2"}
        import urllib.request

        for host in ("127.0.0.1", "127.0.0.2"):
            with urllib.request.urlopen(f"http://{host}:{port}/{host}", timeout=10) as reply:
                assert reply.read().decode() == f"pong /{host}"
    finally:
        proc.communicate("stop\n", timeout=10)
    assert proc.returncode == 0


def test_bind_hosts_add_the_manager_ip_of_a_remote_sweep():
    remote = {"trainingService": {"platform": "remote"}, "nniManagerIp": "10.0.0.5"}
    assert bind_hosts(remote) == ["127.0.0.1", "10.0.0.5"]
    assert bind_hosts({**remote, "nniManagerIp": "127.0.0.1"}) == ["127.0.0.1"]
    assert bind_hosts({"trainingService": {"platform": "local"}, "nniManagerIp": "10.0.0.5"}) == ["127.0.0.1"]
    summary = {"status": "DONE", "trials": [{"id": "a", "status": "SUCCEEDED", "result": "r"}],
               "bind": ["127.0.0.1", "10.0.0.5"], "listen": ["10.0.0.5", "127.0.0.1", "0.0.0.0"]}
    assert _problems(summary) == ["manager: expected to listen on 127.0.0.1, 10.0.0.5 only, got "
                                  "['0.0.0.0', '10.0.0.5', '127.0.0.1']"]
    assert _problems({**summary, "listen": ["10.0.0.5", "127.0.0.1"]}) == []


@pytest.mark.slow
@needs_nnictl
def test_nnictl_tiny_experiment(synthetic_root, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "search_tiny.yml").read_text())
    config["trialCodeDirectory"] = str(REPO)
    config["experimentWorkingDirectory"] = str(tmp_path / "exps")
    config["trialCommand"] = config["trialCommand"].replace(
        "data.root=runs/synthetic_tiny", f"data.root={synthetic_root} data.crop=[32,40]")
    assert str(synthetic_root) in config["trialCommand"]
    cfg_path = tmp_path / "tiny.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()

    seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(ss_listeners(port))
            stop.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc = subprocess.run(
        [sys.executable, "-m", "strategies.nni_local", "create", "--config", str(cfg_path), "--port", str(port),
         "--timeout", "240"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    stop.set()
    sampler.join(timeout=2)
    exp_dirs = [p for p in (tmp_path / "exps").iterdir() if p.is_dir() and not p.name.startswith("_")]
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert len(exp_dirs) == 1
        summary = json.loads((exp_dirs[0] / "paif_summary.json").read_text())
        assert summary["status"] == "DONE" and summary["problems"] == []
        added = ("port", "bind", "listen", "nnictl_exit_code", "problems")
        assert summary == {**experiment_summary(exp_dirs[0]), **{k: summary[k] for k in added}}
        (trial,) = summary["trials"]
        assert trial["status"] == "SUCCEEDED"
        assert trial["parameters"] == {"w": 0.5, "w_arch": 1, "eps": pytest.approx(8 / 255), "attack_steps": 1,
                                       "seed": 0}
        assert trial["final"]["default"] > 0
        result = json.loads(Path(trial["result"]).read_text())
        genotype = Genotype.from_json(Path(trial["result"]).with_name("genotype.json"))
        assert genotype.to_sample() == result["architecture"]
        assert result["config"]["w_arch"] == 1.0 and result["config"]["attack"]["steps"] == 1
        # intermediate result reported once per epoch through NNI
        assert "p/rule/add" in trial["final"]
        # the manager listened, and only on the loopback interface (both by /proc and by ss)
        assert summary["listen"] == ["127.0.0.1"] and summary["bind"] == ["127.0.0.1"]
        assert seen and all(addr == "127.0.0.1" for addr in seen), seen
        assert not listening_addresses(port)  # the manager is gone
    finally:
        if exp_dirs:
            subprocess.run([str(NNICTL), "stop", exp_dirs[0].name], capture_output=True, timeout=60)
