"""configs/search_remote.yml for real: NNI 3.0's remote training service against an sshd on 127.0.0.1.

The test starts its own OpenSSH server (throw-away host and client keys, a free port, ListenAddress
127.0.0.1, a throw-away HOME) and runs the tiny sweep through ``strategies.nni_local create``: NNI logs in
over SSH, runs the project's Python through the worker launcher of ``strategies.nni_remote``, starts its
trial keeper there, uploads the code and runs the trial; ``search_result.json`` then comes back over SSH.
Every process the test starts carries a tag in its environment (sshd passes it into the SSH sessions), so
the listening sockets of the manager, sshd, the trial keeper and the trial can be told apart from the rest
of the machine's and checked: all on 127.0.0.1.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from search_space.genotype import Genotype
from strategies.nni_local import free_port, listening_addresses, listening_sockets
from strategies.nni_remote import fetch_outputs, machines, write_worker_python

REPO = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")
TAG = "PAIF_TEST_TAG"

pytestmark = [
    pytest.mark.skipif(not SSHD.is_file(), reason="openssh-server is not installed (/usr/sbin/sshd is missing; "
                                                  "Debian: apt-get install openssh-server)"),
    pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("ssh-keygen")),
                       reason="the OpenSSH client (ssh, ssh-keygen) is not installed"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "nnictl").is_file(), reason="nnictl is not installed"),
]


# ------------------------------------------------------------------------------------------- processes
def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds ``PAIF_TEST_TAG=<tag>`` (everything this test started)."""
    needle = f"{TAG}={tag}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (fds that close while we look are skipped)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _tagged_listeners(tag: str, extra_pids: tuple[int, ...] = ()) -> set[tuple[str, int, str]]:
    """(address, port, command line) of every listening TCP socket held by a tagged process or ``extra_pids``
    (sshd rewrites its environment area with its process title, so it is named by pid)."""
    sockets = {inode: (addr, port) for addr, port, inode in listening_sockets()}
    found = set()
    for pid in {*_tagged_pids(tag), *extra_pids}:
        for inode in _socket_inodes(pid) & sockets.keys():
            found.add((*sockets[inode], _cmdline(pid)))
    return found


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ sshd
def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "paif-test", "-f", str(path)], check=True)


@pytest.fixture
def sshd(tmp_path):
    """An OpenSSH server on 127.0.0.1:<free port> that accepts a throw-away key for the current user."""
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:  # sshd running as root wants its privilege-separation directory (the Debian service creates it)
            Path("/run/sshd").mkdir(mode=0o755)
        except OSError as exc:
            pytest.skip(f"sshd needs /run/sshd when run as root and it cannot be created: {exc}")
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    _keygen(ssh / "host_key")
    _keygen(ssh / "client_key")
    shutil.copy(ssh / "client_key.pub", ssh / "authorized_keys")
    home = tmp_path / "home"  # the SSH sessions' HOME: NNI's ~/nni-experiments on the "remote host"
    home.mkdir()
    fonts = Path.home() / ".cache" / "matplotlib"
    if fonts.is_dir():  # a used host has its font cache; building one costs ~10 s of the trial
        shutil.copytree(fonts, home / ".cache" / "matplotlib")
    tag = uuid.uuid4().hex
    port = free_port()
    config = ssh / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {ssh / 'host_key'}", f"PidFile {ssh / 'sshd.pid'}",
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        "AllowTcpForwarding no", "X11Forwarding no", "Subsystem sftp internal-sftp",
        f"SetEnv HOME={home} {TAG}={tag}", "",
    ]))
    known_hosts = ssh / "known_hosts"
    key_type, key = (ssh / "host_key.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")  # the client checks the host key strictly
    log = ssh / "sshd.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, TAG: tag})
    try:
        deadline = time.monotonic() + 20
        while "127.0.0.1" not in listening_addresses(port):
            assert proc.poll() is None, f"sshd exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()}"
            time.sleep(0.1)
        yield {"port": port, "key": ssh / "client_key", "known_hosts": known_hosts, "home": home, "tag": tag,
               "log": log, "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in _tagged_pids(tag):  # a trial keeper or session left behind by a failed run
            _stop(pid)


def _ssh_options(server: dict) -> list[str]:
    return [f"UserKnownHostsFile={server['known_hosts']}", "StrictHostKeyChecking=yes"]


def _remote_config(tmp_path: Path, server: dict) -> Path:
    """configs/search_remote.yml with search_tiny.yml's sweep and this test's sshd as the only machine."""
    config = yaml.safe_load((REPO / "configs" / "search_remote.yml").read_text())
    tiny = yaml.safe_load((REPO / "configs" / "search_tiny.yml").read_text())
    for key in ("searchSpace", "trialCommand", "maxTrialNumber"):
        config[key] = tiny[key]
    config["trialConcurrency"] = 1
    config["trialCodeDirectory"] = str(REPO)
    config["experimentWorkingDirectory"] = str(tmp_path / "exps")
    config["nniManagerIp"] = "127.0.0.1"
    (machine,) = config["trainingService"]["machineList"][:1]
    machine.update(host="127.0.0.1", port=server["port"], user=getpass.getuser(), sshKeyFile=str(server["key"]),
                   pythonPath=str(write_worker_python(tmp_path / "worker-python")))
    config["trainingService"]["machineList"] = [machine]
    path = tmp_path / "remote.yml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------------------------------------ tests
def test_remote_config_runs_search_yml_sweep():
    remote = yaml.safe_load((REPO / "configs" / "search_remote.yml").read_text())
    local = yaml.safe_load((REPO / "search.yml").read_text())
    assert remote["searchSpace"] == local["searchSpace"] and remote["trialCommand"] == local["trialCommand"]
    assert remote["trainingService"]["platform"] == "remote" and remote["nniManagerIp"]
    assert [m.host for m in machines(remote)] == ["192.0.2.11", "192.0.2.12"]
    assert all(m["pythonPath"] for m in remote["trainingService"]["machineList"])


def test_machine_list_errors_name_the_field():
    with pytest.raises(ValueError, match=r"trainingService.platform: expected remote, got 'local'"):
        machines({"trainingService": {"platform": "local"}})
    with pytest.raises(ValueError, match=r"machineList\[1\].user: expected a non-empty string, got None"):
        machines({"trainingService": {"platform": "remote", "machineList": [{"host": "a", "user": "u"},
                                                                            {"host": "b"}]}})
    with pytest.raises(ValueError, match=r"machineList\[0\].port: expected an integer in 1..65535, got 0"):
        machines({"trainingService": {"platform": "remote", "machineList": [{"host": "a", "user": "u", "port": 0}]}})


def test_remote_config_without_manager_ip_fails_before_nnictl(tmp_path, capsys):
    from strategies import nni_local

    config = yaml.safe_load((REPO / "configs" / "search_remote.yml").read_text())
    del config["nniManagerIp"]
    config["experimentWorkingDirectory"] = str(tmp_path / "exps")
    path = tmp_path / "remote.yml"
    path.write_text(yaml.safe_dump(config))
    assert nni_local.main(["create", "--config", str(path)]) == 2
    assert "nniManagerIp: expected this machine's IP address as the remote workers see it" in capsys.readouterr().err
    assert not (tmp_path / "exps").exists()


def test_worker_python_runs_this_interpreter_pinned(tmp_path):
    out = write_worker_python(tmp_path / "wp")
    probe = ("import json, os, sys; print(json.dumps({'exe': sys.executable, 'node': os.environ['NODE_OPTIONS'], "
             "'host': os.environ['PAIF_BIND_HOST'], 'pip': os.environ['PIP_NO_INDEX']}))")
    done = subprocess.run([str(out / "python"), "-c", probe], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout)
    assert Path(seen["exe"]).resolve() == Path(sys.executable).resolve()
    assert seen["node"] == f"--require {REPO / 'strategies' / 'localhost_preload.js'}"
    assert seen["host"] == "127.0.0.1" and seen["pip"] == "1"


@pytest.mark.slow
def test_remote_sweep_through_sshd_on_localhost(tmp_path, sshd):
    config = _remote_config(tmp_path, sshd)
    port = free_port()
    seen: set[tuple[str, int, str]] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(_tagged_listeners(sshd["tag"], (sshd["pid"],)))
            stop.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    args = ["create", "--config", str(config), "--port", str(port), "--timeout", "150"]
    args += [a for opt in _ssh_options(sshd) for a in ("--ssh-option", opt)]
    try:
        proc = subprocess.run([sys.executable, "-m", "strategies.nni_local", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=200, env={**os.environ, TAG: sshd["tag"], "PYTHONPATH": str(REPO)})
    finally:
        stop.set()
        sampler.join(timeout=5)
    exps = [p for p in (tmp_path / "exps").iterdir() if p.is_dir() and not p.name.startswith("_")]
    remote_exp = sshd["home"] / "nni-experiments" / exps[0].name if exps else None
    diagnostics = proc.stdout[-3000:] + proc.stderr[-3000:] + (
        "".join(f"\n--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in remote_exp.rglob("*.log"))
        if remote_exp else "")
    assert proc.returncode == 0, diagnostics
    summary = json.loads((exps[0] / "paif_summary.json").read_text())
    assert summary["status"] == "DONE" and summary["problems"] == []
    (trial,) = summary["trials"]
    assert trial["status"] == "SUCCEEDED"

    # the trial ran through NNI's remote path: a worker on the SSH host, outputs in the session's HOME
    remote_trial = remote_exp / "environments" / "remote-worker1" / "trials" / trial["id"]
    assert trial["remote_dir"] == f"127.0.0.1:~/nni-experiments/{exps[0].name}/environments/remote-worker1/" \
                                  f"trials/{trial['id']}"
    assert (remote_trial / "trial.log").is_file()
    result_path = Path(trial["result"])
    assert result_path == exps[0] / "trials" / trial["id"] / "search" / "search_result.json"
    result = json.loads(result_path.read_text())
    assert result_path.read_bytes() == (remote_trial / "search" / "search_result.json").read_bytes()
    assert result["config"]["run_dir"] == str(remote_trial / "search")
    assert trial["final"]["default"] == pytest.approx(result["selection"]["value"])
    assert trial["parameters"]["w_arch"] == 1 and result["config"]["w_arch"] == 1.0
    assert Genotype.from_json(result_path.with_name("genotype.json")).to_sample() == result["architecture"]
    assert (remote_trial / "search" / "checkpoints").is_dir() and not (result_path.parent / "checkpoints").exists()

    # every server stayed on 127.0.0.1: the manager (both samplers), sshd and NNI's trial keeper on the "host"
    assert summary["listen"] == ["127.0.0.1"]
    ports = {p for _addr, p, _cmd in seen}
    assert {port, sshd["port"]} <= ports, seen
    assert any("trial_keeper" in cmd for _addr, _p, cmd in seen), f"the trial keeper never listened: {seen}"
    assert {addr for addr, _p, _cmd in seen} == {"127.0.0.1"}, seen
    # the run is over: nothing the test started listens any more but sshd
    assert {(a, p) for a, p, _c in _tagged_listeners(sshd["tag"], (sshd["pid"],))} == {("127.0.0.1", sshd["port"])}


def test_fetch_reports_a_wrong_host_key_and_a_missing_folder(tmp_path, sshd):
    """``fetch`` with a host key that does not match, then with a folder that is not there: one-line problems."""
    exp = tmp_path / "exp"
    (exp / "db").mkdir(parents=True)
    con = sqlite3.connect(exp / "db" / "nni.sqlite")
    con.execute("CREATE TABLE TrialJobEvent (timestamp, trialJobId, event, data, logPath, sequenceId, message)")
    con.execute("CREATE TABLE MetricData (timestamp, trialJobId, parameterId, type, sequence, data)")
    con.execute("INSERT INTO TrialJobEvent VALUES (1, 'T1', 'SUCCEEDED', NULL, '127.0.0.1:~/nowhere/T1', 0, NULL)")
    con.commit()
    con.close()
    config = yaml.safe_load(_remote_config(tmp_path, sshd).read_text())
    wrong = tmp_path / "wrong_known_hosts"
    other = tmp_path / "other"
    _keygen(other)
    key_type, key = (tmp_path / "other.pub").read_text().split()[:2]
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} {key_type} {key}\n")
    problems = fetch_outputs(exp, config, [f"UserKnownHostsFile={wrong}", "StrictHostKeyChecking=yes"])
    assert len(problems) == 1 and problems[0].startswith("trial T1: fetch ")
    assert "host key" in problems[0].lower() or "verification failed" in problems[0].lower(), problems
    problems = fetch_outputs(exp, config, _ssh_options(sshd))  # right key, but no such trial folder there
    assert len(problems) == 1 and "~/nowhere/T1/search" in problems[0]
    assert not (exp / "trials" / "T1" / "search").exists()
