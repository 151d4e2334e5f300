"""The plain `nnictl` of the project's environment: 127.0.0.1 only, NNI's experiment index under runs/ (not ~).

The hook that `make install` puts into site-packages (`python -m strategies.nni_local install-hook`) is exercised
here without touching the shared environment: its exact line runs through `site.addsitedir` (the .pth path) and
as a `sitecustomize` on PYTHONPATH in front of the real `nnictl create` (the start-up path)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from strategies import nni_local
from strategies.nni_local import (
    HOOK_FILE, PRELOAD, _working_directory, apply_hook, free_port, hook_line, install_hook, listening_addresses,
    localhost_env, nni_home, uninstall_hook,
)

REPO = Path(__file__).resolve().parents[2]
NNICTL = Path(sys.executable).parent / "nnictl"


def test_localhost_env_redirects_nni_home_and_keeps_the_user_home(tmp_path):
    base = {"HOME": "/home/someone", "PATH": "/usr/bin", "PAIF_NNI_HOME": str(tmp_path / "h")}
    env = localhost_env(base)
    assert env["HOME"] == str(tmp_path / "h") and env["PAIF_USER_HOME"] == "/home/someone"
    assert (tmp_path / "h" / "nni-experiments").is_dir()
    assert str(PRELOAD) in env["NODE_OPTIONS"] and env["PAIF_BIND_HOST"] == "127.0.0.1"
    assert localhost_env(env) == env  # idempotent: the user's home is not replaced by the redirected one
    assert nni_home({"PAIF_NNI_HOME": "~"}) is None  # opt out: NNI keeps ~/nni-experiments
    assert "HOME" not in localhost_env({"PAIF_NNI_HOME": "~", "PATH": ""})
    assert nni_home({}) == REPO / "runs"  # default: the checkout's runs/
    cfg = tmp_path / "c.yml"
    cfg.write_text("experimentName: x\n")  # no experimentWorkingDirectory: NNI's default ~/nni-experiments
    assert _working_directory(cfg, str(tmp_path / "h")) == tmp_path / "h" / "nni-experiments"


def test_apply_hook_only_in_nnictl(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply_hook edits the environment: work on a copy
    monkeypatch.setenv("PAIF_NNI_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("NODE_OPTIONS", raising=False)
    assert not apply_hook("/venv/bin/python") and "NODE_OPTIONS" not in os.environ
    monkeypatch.setenv("PAIF_NNICTL_HOOK", "0")
    assert not apply_hook("/venv/bin/nnictl")
    monkeypatch.delenv("PAIF_NNICTL_HOOK")
    assert apply_hook("/venv/bin/nnictl")
    assert str(PRELOAD) in os.environ["NODE_OPTIONS"] and os.environ["HOME"] == str(tmp_path / "h")


def _remote_config(tmp_path: Path) -> Path:
    """configs/search_remote.yml with four machines: key under ~, NNI's default key, a password, an absolute key."""
    config = yaml.safe_load((REPO / "configs" / "search_remote.yml").read_text())
    config["nniManagerIp"] = "10.0.0.5"
    config["trainingService"]["machineList"] = [
        {"host": "10.0.0.11", "user": "u", "sshKeyFile": "~/.ssh/id_ed25519"},
        {"host": "10.0.0.12", "user": "u"},
        {"host": "10.0.0.13", "user": "u", "password": "secret"},
        {"host": "10.0.0.14", "user": "u", "sshKeyFile": str(tmp_path / "user" / ".ssh" / "id_ed25519")},
    ]
    path = tmp_path / "configs" / "remote.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:SSH password will be exposed")
def test_hook_on_a_remote_sweep_binds_its_manager_ip_and_finds_the_users_ssh_keys(monkeypatch, tmp_path):
    """Plain `nnictl create --config remote.yml`: the manager also listens on nniManagerIp, and NNI (running with
    HOME = NNI's home) gets a config whose `~/.ssh/...` keys are the user's, which it accepts."""
    from nni.experiment.config import ExperimentConfig

    user = tmp_path / "user"
    (user / ".ssh").mkdir(parents=True)
    for key in ("id_ed25519", "id_rsa"):
        (user / ".ssh" / key).write_text("key\n")
    config = _remote_config(tmp_path)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply_hook edits the environment: work on a copy
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("PAIF_NNI_HOME", str(tmp_path / "nnihome"))
    monkeypatch.delenv("PAIF_USER_HOME", raising=False)
    with pytest.raises(ValueError, match=r"valid SSH key file .*nnihome/\.ssh/id_ed25519"):  # what NNI did before
        monkeypatch.setenv("HOME", str(tmp_path / "nnihome"))
        ExperimentConfig.load(str(config)).validate()
    monkeypatch.setenv("HOME", str(user))

    argv = ["/venv/bin/nnictl", "create", "--config", str(config), "--port", "8080"]
    assert apply_hook(argv=argv)
    assert os.environ["PAIF_BIND_HOST"] == "127.0.0.1,10.0.0.5" and os.environ["HOME"] == str(tmp_path / "nnihome")
    resolved = Path(argv[3])
    try:
        assert resolved != config and resolved.parent == config.parent  # relative paths keep their meaning
        machines = yaml.safe_load(resolved.read_text())["trainingService"]["machineList"]
        assert [m.get("sshKeyFile") for m in machines] == [str(user / ".ssh" / "id_ed25519"),
                                                           str(user / ".ssh" / "id_rsa"), None,
                                                           str(user / ".ssh" / "id_ed25519")]
        ExperimentConfig.load(str(resolved)).validate()  # HOME is NNI's home here, as in nnictl
        assert yaml.safe_load(config.read_text())["trainingService"]["machineList"][0]["sshKeyFile"] == \
            "~/.ssh/id_ed25519"  # the user's file is untouched
    finally:
        resolved.unlink(missing_ok=True)
    local = ["/venv/bin/nnictl", "create", "--config", str(REPO / "search.yml")]
    assert apply_hook(argv=local) and local[3] == str(REPO / "search.yml")
    assert os.environ["PAIF_BIND_HOST"] == "127.0.0.1"


def test_create_removes_its_resolved_remote_config(monkeypatch, tmp_path):
    config = _remote_config(tmp_path)
    monkeypatch.setenv("PAIF_NNI_HOME", str(tmp_path / "nnihome"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("PAIF_USER_HOME", raising=False)
    seen = []

    def no_nnictl() -> str:
        seen.extend(p.name for p in config.parent.iterdir())
        raise FileNotFoundError("nnictl: none here")

    monkeypatch.setattr(nni_local, "_nnictl", no_nnictl)
    with pytest.raises(FileNotFoundError, match="nnictl: none here"):
        nni_local.create(config, port=free_port(), echo=False)
    assert sorted(seen) == [f".remote.paif-{os.getpid()}.yml", "remote.yml"]  # the copy existed while nnictl ran
    assert [p.name for p in config.parent.iterdir()] == ["remote.yml"]


def _probe(tmp_path: Path, name: str, site: Path) -> dict:
    """Run a script called ``name`` that processes ``site`` like start-up does, then prints its environment."""
    script = tmp_path / name
    script.write_text(f"import site, sys, os, json\nsite.addsitedir({str(site)!r})\n"
                      "print(json.dumps({k: os.environ.get(k) for k in ('NODE_OPTIONS', 'HOME', 'PAIF_BIND_HOST')}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAIF_NNI_HOME": str(tmp_path / "nnihome"), "HOME": "/home/u"}
    env.pop("NODE_OPTIONS", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_pth_line_acts_in_nnictl_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    path = install_hook(site)
    assert path.name == HOOK_FILE and path.read_text() == hook_line()
    assert hook_line().startswith("import sys;")  # site only executes .pth lines that start with import
    seen = _probe(tmp_path, "nnictl", site)
    assert str(PRELOAD) in seen["NODE_OPTIONS"] and seen["PAIF_BIND_HOST"] == "127.0.0.1"
    assert seen["HOME"] == str(tmp_path / "nnihome")
    assert _probe(tmp_path, "other.py", site) == {"NODE_OPTIONS": None, "HOME": "/home/u", "PAIF_BIND_HOST": None}
    assert uninstall_hook(site) and not path.exists() and not uninstall_hook(site)


def _startup_race(output: str) -> bool:
    """nnictl's own start-up failures on a slow machine: its ~3 s check of the manager's REST server ran out
    (connection refused, or an answer before the server was ready)."""
    return any(text in output for text in ("Timeout, retry", "Connection refused", "JSONDecodeError"))


def test_preload_gives_nni_the_redirected_home_and_the_trials_the_user_home(tmp_path):
    try:
        import nni_node
    except ImportError:  # pragma: no cover
        pytest.skip("NNI's bundled node is missing")
    node = Path(nni_node.__path__[0]) / "node"
    script = tmp_path / "probe.js"
    script.write_text("const os = require('os'); const cp = require('child_process');\n"
                      "const child = cp.execSync('echo $HOME').toString().trim();\n"
                      "console.log(JSON.stringify({homedir: os.homedir(), child}));\n")
    env = localhost_env({"HOME": "/home/someone", "PATH": os.environ.get("PATH", ""),
                         "PAIF_NNI_HOME": str(tmp_path / "runs")})
    done = subprocess.run([str(node), str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # NNI's manager puts its index at os.homedir()/nni-experiments/.experiment; the trials it starts see ~ again
    assert json.loads(done.stdout) == {"homedir": str(tmp_path / "runs"), "child": "/home/someone"}


def _index(home: Path) -> dict:
    path = home / "nni-experiments" / ".experiment"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.slow
@pytest.mark.skipif(not NNICTL.is_file(), reason="nnictl is not installed next to this Python")
def test_plain_nnictl_create_binds_loopback_and_indexes_under_nni_home(tmp_path):
    """`nnictl create --config X --port P` exactly, with the hook as start-up code: the manager listens on
    127.0.0.1 only (/proc/net/tcp and ss), the index is in PAIF_NNI_HOME, not in ~, and the trial sees the user's
    HOME. Starts and stops a real experiment (a sleeping trial)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_line())
    seen_home = tmp_path / "trial_home.txt"
    config = {"experimentName": "paif-plain-probe", "searchSpace": {"x": {"_type": "choice", "_value": [1]}},
              "trialCommand": f"python -c \"import os, time; open({str(seen_home)!r}, 'w').write(os.environ['HOME']); "
                              "time.sleep(120)\"",
              "trialCodeDirectory": str(tmp_path), "trialConcurrency": 1, "maxTrialNumber": 1,
              "tuner": {"name": "GridSearch"}, "experimentWorkingDirectory": str(tmp_path / "exps"),
              "trainingService": {"platform": "local"}}
    cfg = tmp_path / "probe.yml"
    cfg.write_text(yaml.safe_dump(config))
    nni_home_dir, user_home = tmp_path / "nnihome", Path(os.path.expanduser("~"))
    before = set(_index(user_home))
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_OPTIONS", "PAIF_NNI_HOME", "PAIF_BIND_HOST")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), PAIF_NNI_HOME=str(nni_home_dir),
               PATH=os.pathsep.join([str(NNICTL.parent), env.get("PATH", "")]))
    started = time.monotonic()
    for _attempt in range(3):  # nnictl gives its manager ~3 s to answer (3 polls of /check-status, 1 s apart)
        port = free_port()
        out = subprocess.run([str(NNICTL), "create", "--config", str(cfg), "--port", str(port)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=180)
        if out.returncode == 0 or not _startup_race(out.stdout + out.stderr):
            break
        for exp in _index(nni_home_dir):
            subprocess.run([str(NNICTL), "stop", exp], env=env, capture_output=True, timeout=120)
        (nni_home_dir / "nni-experiments" / ".experiment").unlink(missing_ok=True)
    else:
        pytest.skip("the NNI manager did not answer within nnictl's 3 s start-up check in 3 attempts (an overloaded "
                    "machine; plain NNI fails the same way there); run the manual check of the README instead")
    exp_ids = list(_index(nni_home_dir))
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert len(exp_ids) == 1, (out.stdout[-2000:], _index(nni_home_dir))
        listen = listening_addresses(port)
        assert listen == {"127.0.0.1"}, listen
        if shutil.which("ss"):
            ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert [line.split()[3].rsplit(":", 1)[0] for line in ss.splitlines() if line.strip()] == ["127.0.0.1"]
        assert set(_index(user_home)) == before  # nothing added to ~/nni-experiments/.experiment
        deadline = time.monotonic() + 90
        while not seen_home.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert seen_home.read_text() == str(user_home)  # the trial runs with the user's HOME
    finally:
        stop = subprocess.run([str(NNICTL), "stop", *exp_ids[:1]], env=env, capture_output=True, text=True,
                              timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for _ in range(40):
        if not listening_addresses(port):
            break
        time.sleep(0.5)
    assert not listening_addresses(port)
    print(f"plain nnictl create + stop took {time.monotonic() - started:.1f} s")
