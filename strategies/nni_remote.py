"""The search sweep on NNI 3.0's ``remote`` training service: worker Python, machine list, results back.

PAIF (Liu et al., ACM MM 2023) search sweeps (``search.yml``) spread over machines with
``configs/search_remote.yml``. NNI's remote service (``nni_node/training_service/remote_v3``) connects to
every host of ``trainingService.machineList`` over SSH, prepends the machine's ``pythonPath`` to ``PATH``,
runs ``python -m pip install nni --upgrade``, starts a trial keeper (a Node.js process with a small HTTP
server for its trials) that dials back to the manager at ``nniManagerIp``, uploads ``trialCodeDirectory``
(minus ``.nniignore``) and runs ``trialCommand`` there. Outputs stay on the host, under
``~/nni-experiments/<experiment>/environments/<worker>/trials/<trial>/``.

This module supplies the two pieces NNI leaves to the user:

* ``worker-python`` (run once on each host, with the project's Python): writes a ``python`` launcher whose
  directory is the machine's ``pythonPath``. It runs the project's interpreter with the Node preload
  (``strategies/localhost_preload.js``) in ``NODE_OPTIONS``, so the trial keeper's server listens on
  127.0.0.1 only, and with ``PIP_NO_INDEX=1``, so NNI's ``pip install nni --upgrade`` keeps the installed
  ``nni==3.0`` (the version the manager speaks; hosts without internet access work).
* ``fetch``: copies each trial's ``search/`` folder (without its ``checkpoints/`` unless asked) back
  over SSH into ``<experiment dir>/trials/<trial>/search/``, where :func:`strategies.nni_local.experiment_summary`
  and ``derive/export_genotype.py`` find it. ``strategies.nni_local create`` does this after a remote run.

Commands::

    python -m strategies.nni_remote worker-python [--out DIR]        # on each host; prints its pythonPath
    python -m strategies.nni_local create --config configs/search_remote.yml   # on the manager
    python -m strategies.nni_remote fetch --config configs/search_remote.yml \\
        --experiment-dir runs/nni-experiments/<id> [--checkpoints] [--ssh-option KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from strategies.nni_local import BIND_HOST, PRELOAD, experiment_summary

__all__ = ["WORKER_PYTHON_DIR", "Machine", "machines", "write_worker_python", "ssh_command", "fetch_outputs", "main"]

log = logging.getLogger(__name__)

#: default folder of the worker launcher (its path is the machine's ``pythonPath``)
WORKER_PYTHON_DIR = Path("~/.paif/nni-python")
OUTPUT_DIR = "search"  # what strategies.trial writes under NNI_OUTPUT_DIR


@dataclass(frozen=True)
class Machine:
    """One entry of ``trainingService.machineList`` (NNI's ``RemoteMachineConfig`` fields we need)."""

    host: str
    user: str
    port: int = 22
    ssh_key_file: str | None = "~/.ssh/id_rsa"
    password: str | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"


def machines(config: dict[str, Any], where: str = "config") -> list[Machine]:
    """The machine list of a remote NNI experiment config (camelCase keys, as in the YAML).

    Raises:
        ValueError: naming the entry and field when the platform is not ``remote`` or a field is missing.
    """
    service = config.get("trainingService") or {}
    if service.get("platform") != "remote":
        raise ValueError(f"{where}: trainingService.platform: expected remote, got {service.get('platform')!r}")
    entries = service.get("machineList")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: trainingService.machineList: expected a non-empty list of machines, "
                         f"got {entries!r}")
    out = []
    for i, m in enumerate(entries):
        key = f"{where}: trainingService.machineList[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{key}: expected a mapping with host, user, ..., got {m!r}")
        for field in ("host", "user"):
            if not m.get(field):
                raise ValueError(f"{key}.{field}: expected a non-empty string, got {m.get(field)!r}")
        port = m.get("port", 22)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{key}.port: expected an integer in 1..65535, got {port!r}")
        password = m.get("password")  # NNI ignores the key file when a password is given
        key_file = m.get("sshKeyFile") if password is not None else m.get("sshKeyFile", "~/.ssh/id_rsa")
        out.append(Machine(host=str(m["host"]), user=str(m["user"]), port=port, ssh_key_file=key_file,
                           password=password))
    return out


# ------------------------------------------------------------------------------------------- worker python
_LAUNCHER = """#!/bin/sh
# NNI remote worker python for PAIF (written by python -m strategies.nni_remote worker-python).
# NNI's trial keeper and the trials run through it: its Node servers stay on {host} and NNI's
# "pip install nni --upgrade" keeps the installed nni.
export NODE_OPTIONS={node_options}
export PAIF_BIND_HOST={host}
export PIP_NO_INDEX=1
exec {python} "$@"
"""


def write_worker_python(out_dir: str | Path = WORKER_PYTHON_DIR, python: str | Path = sys.executable,
                        preload: str | Path = PRELOAD) -> Path:
    """Write ``out_dir/python`` (executable), the launcher NNI finds through ``pythonPath``; returns ``out_dir``.

    Args:
        out_dir: the folder to name as the machine's ``pythonPath`` (created; ``~`` expanded).
        python: the project's interpreter on this host (default: the one running this).
        preload: the Node preload that pins listening sockets to 127.0.0.1.
    """
    python, preload = Path(python).absolute(), Path(preload).resolve()
    if not preload.is_file():
        raise FileNotFoundError(f"preload {preload}: expected strategies/localhost_preload.js, got no such file")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = out_dir / "python"
    tmp = out_dir / ".python.tmp"
    tmp.write_text(_LAUNCHER.format(node_options=shlex.quote(f"--require {preload}"), host=BIND_HOST,
                                    python=shlex.quote(str(python))))
    tmp.chmod(0o755)
    os.replace(tmp, launcher)
    return out_dir


# ------------------------------------------------------------------------------------------------ fetch
def ssh_command(machine: Machine, remote: str, options: Sequence[str] = ()) -> list[str]:
    """``ssh`` argv that runs the shell command ``remote`` on ``machine`` without prompting (BatchMode)."""
    cmd = ["ssh", "-p", str(machine.port), "-o", "BatchMode=yes"]
    if machine.ssh_key_file:
        cmd += ["-i", os.path.expanduser(str(machine.ssh_key_file)), "-o", "IdentitiesOnly=yes"]
    for opt in options:
        cmd += ["-o", opt]
    return cmd + [machine.target, remote]


def _remote_path(path: str) -> str:
    """Shell-quote a remote path, leaving a leading ``~/`` to the remote shell."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def _fetch_one(machine: Machine, remote_dir: str, local_dir: Path, checkpoints: bool,
               options: Sequence[str]) -> str | None:
    """Copy ``remote_dir/search`` to ``local_dir/search``; None, or a one-line problem."""
    exclude = "" if checkpoints else f" --exclude={OUTPUT_DIR}/checkpoints"
    remote = f"tar -C {_remote_path(remote_dir)} -cf -{exclude} {OUTPUT_DIR}"
    local_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local_dir, prefix=".fetch-") as tmp:
        proc = subprocess.Popen(ssh_command(machine, remote, options), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                tar.extractall(tmp, filter="data")
        except tarfile.TarError as exc:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.wait()
            return (f"fetch {machine.target}:{remote_dir}/{OUTPUT_DIR}: expected a tar stream, got "
                    f"{type(exc).__name__} ({err.splitlines()[-1] if err else exc})")
        err = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() != 0:
            return f"fetch {machine.target}:{remote_dir}/{OUTPUT_DIR}: ssh/tar exited {proc.returncode} ({err[-300:]})"
        target = local_dir / OUTPUT_DIR
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / OUTPUT_DIR, target)
    return None


def fetch_outputs(exp_dir: str | Path, config: dict[str, Any], ssh_options: Sequence[str] = (),
                  checkpoints: bool = False) -> list[str]:
    """Copy every remote trial's ``search/`` into ``exp_dir/trials/<trial>/search``; returns problems (one line each).

    The host of a trial is the one in its NNI log path (``<host>:<path>``); its SSH settings come from the
    machine list of ``config``. ``ssh_options`` are extra ``ssh -o`` options (e.g. a known-hosts file).
    """
    exp_dir = Path(exp_dir)
    by_host: dict[str, Machine] = {}
    for m in machines(config):
        by_host.setdefault(m.host, m)
    problems = []
    for trial in experiment_summary(exp_dir)["trials"]:
        remote = trial.get("remote_dir")
        if not remote or trial.get("status") != "SUCCEEDED":
            continue
        host, _, path = remote.partition(":")
        machine = by_host.get(host)
        if machine is None:
            problems.append(f"trial {trial['id']}: ran on {host}, which the machine list does not name")
        elif machine.password is not None and not machine.ssh_key_file:
            problems.append(f"trial {trial['id']}: {machine.target} logs in with a password; fetching needs "
                            f"sshKeyFile (or copy {remote}/{OUTPUT_DIR} yourself)")
        else:
            problem = _fetch_one(machine, path, Path(trial["dir"]), checkpoints, ssh_options)
            if problem:
                problems.append(f"trial {trial['id']}: {problem}")
            else:
                log.info("fetched %s/%s -> %s", remote, OUTPUT_DIR, trial["dir"])
    return problems


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker-python", help="write the python launcher whose folder is a machine's pythonPath")
    w.add_argument("--out", default=str(WORKER_PYTHON_DIR), help=f"folder (default {WORKER_PYTHON_DIR})")
    f = sub.add_parser("fetch", help="copy the trials' search/ folders back from the remote hosts")
    f.add_argument("--config", required=True, help="the remote experiment YAML (machine list)")
    f.add_argument("--experiment-dir", required=True, help="local experiment folder (runs/nni-experiments/<id>)")
    f.add_argument("--checkpoints", action="store_true", help="also copy search/checkpoints/")
    f.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="extra ssh -o option")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "worker-python":
        out = write_worker_python(args.out)
        print(json.dumps({"pythonPath": str(out), "python": sys.executable, "preload": str(PRELOAD.resolve())}))
        return 0
    config_path = Path(args.config)
    if not config_path.is_file():
        print(f"error: --config {config_path}: expected an NNI experiment YAML, got no such file", file=sys.stderr)
        return 2
    try:
        problems = fetch_outputs(args.experiment_dir, yaml.safe_load(config_path.read_text()) or {},
                                 args.ssh_option, args.checkpoints)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
