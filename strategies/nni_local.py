"""Run ``nnictl create --foreground`` with the NNI manager pinned to 127.0.0.1, then check the outcome.

PAIF (Liu et al., ACM MM 2023) search sweeps run as an HPO-type NNI 3.0 experiment (``search.yml``). NNI's
manager is a Node.js server that listens on all interfaces and starts TensorBoard with ``--bind_all``;
nnictl passes its environment through to it, so this wrapper sets
``NODE_OPTIONS=--require strategies/localhost_preload.js`` (the preload forces every listening socket onto
``127.0.0.1`` and rewrites ``--bind_all``). It also puts this interpreter's directory first on ``PATH`` (the
trials' ``python`` is the project's).

``nnictl create --foreground`` exits 0 even when trials fail; this wrapper reads the experiment's database
and log and exits non-zero unless the experiment is DONE, every trial SUCCEEDED and wrote a
``search_result.json``, and the manager listened on the loopback interface only. A summary is written to
``<experiment dir>/paif_summary.json`` and printed.

NNI's experiment index (``~/nni-experiments/.experiment``, read by ``nnictl list/stop/view``) is kept in the
project instead: NNI's Python side and its Node manager both take "home" from ``HOME``, so ``nnictl`` runs with
``HOME=<project>/runs`` (:func:`nni_home`; ``PAIF_NNI_HOME`` chooses another folder, ``PAIF_NNI_HOME=~`` keeps
the user's home) and the preload gives the manager's children (the trials) the user's ``HOME`` back.

**The plain command.** ``python -m strategies.nni_local install-hook`` (run by ``make install``) puts a one-line
``.pth`` startup hook into this virtual environment: when the program is ``nnictl`` (any subcommand), it applies
:func:`localhost_env` to the process before NNI is imported, so ``nnictl create --config search.yml`` typed as is
binds 127.0.0.1 and writes its index under ``runs/``. Other programs are untouched; ``PAIF_NNICTL_HOOK=0``
switches the hook off for one call; ``uninstall-hook`` removes it. Commands::

    python -m strategies.nni_local create --config search.yml [--port 8080] [--timeout 3600]
    python -m strategies.nni_local check --experiment-dir runs/nni-experiments/<id>
    python -m strategies.nni_local install-hook | uninstall-hook | hook-status

On NNI's ``remote`` training service (``configs/search_remote.yml``) the manager also listens on the
config's ``nniManagerIp`` (the address the workers dial; no other interface), and after the run each
trial's ``search/`` folder is copied back over SSH from the host that ran it into
``<experiment dir>/trials/<trial>/search/`` (:mod:`strategies.nni_remote`).
"""
from __future__ import annotations

import argparse
import atexit
import copy
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = [
    "PRELOAD",
    "HOOK_FILE",
    "nni_home",
    "localhost_env",
    "apply_hook",
    "hook_line",
    "install_hook",
    "uninstall_hook",
    "bind_hosts",
    "resolve_key_files",
    "free_port",
    "listening_sockets",
    "listening_addresses",
    "experiment_summary",
    "create",
    "main",
]

log = logging.getLogger(__name__)

PRELOAD = Path(__file__).with_name("localhost_preload.js")
BIND_HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUS_CHANGE = re.compile(r"Change NNIManager status from: (\w+) to: (\w+)")
_REMOTE_DIR = re.compile(r"^([^/:\\]+):(.+)$")  # a remote trial's log path: "<host>:<path on that host>"


NNI_HOME_ENV = "PAIF_NNI_HOME"
USER_HOME_ENV = "PAIF_USER_HOME"
HOOK_ENV = "PAIF_NNICTL_HOOK"
HOOK_FILE = "paif_nnictl_localhost.pth"
_PROJECT = Path(__file__).resolve().parents[1]


def nni_home(environ: dict[str, str] | None = None) -> Path | None:
    """The folder NNI is given as home (its index is ``<home>/nni-experiments/.experiment``), or None to leave
    ``HOME`` alone: ``PAIF_NNI_HOME`` when set (``~`` or empty: None), else ``runs/`` of the project checkout
    (of the working directory when the package is installed without its checkout)."""
    env = os.environ if environ is None else environ
    raw = env.get(NNI_HOME_ENV)
    if raw is not None:
        return None if raw.strip() in ("", "~") else Path(os.path.expanduser(raw)).resolve()
    root = _PROJECT if (_PROJECT / "pyproject.toml").is_file() else Path.cwd()
    return root / "runs"


def localhost_env(base: dict[str, str] | None = None, hosts: Sequence[str] = (BIND_HOST,)) -> dict[str, str]:
    """``base`` (default: os.environ) plus the Node preload in NODE_OPTIONS, this Python first on PATH and NNI's
    home redirected to :func:`nni_home` (the user's ``HOME`` kept in ``PAIF_USER_HOME`` for the trials).

    ``hosts``: the addresses Node servers may listen on (the first one is used, the others mirror it;
    :func:`bind_hosts`). Idempotent: applying it to its own result changes nothing.
    """
    env = dict(os.environ if base is None else base)
    preload = f'"{PRELOAD}"' if " " in str(PRELOAD) else str(PRELOAD)
    require = f"--require {preload}"
    if require not in env.get("NODE_OPTIONS", ""):
        env["NODE_OPTIONS"] = f"{env.get('NODE_OPTIONS', '')} {require}".strip()
    env["PAIF_BIND_HOST"] = ",".join(hosts)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    home = nni_home(env)
    if home is not None:
        env.setdefault(USER_HOME_ENV, env.get("HOME", os.path.expanduser("~")))
        env[NNI_HOME_ENV] = str(home)
        env["HOME"] = str(home)
        (home / "nni-experiments").mkdir(parents=True, exist_ok=True)
    return env


# ----------------------------------------------------------------------------------- the plain-nnictl hook
def apply_hook(argv0: str | None = None, argv: list[str] | None = None) -> bool:
    """Run by the ``.pth`` hook at interpreter start-up: in an ``nnictl`` process, apply :func:`localhost_env` to
    ``os.environ`` (before NNI reads it). Returns whether it did.

    For ``nnictl create --config C`` the config decides where the manager listens (:func:`bind_hosts`: a remote
    sweep's ``nniManagerIp`` too), and a remote config whose SSH keys lie under ``~`` is swapped in ``argv`` (default
    ``sys.argv``, edited in place) for a copy with the user's home spelled out (:func:`resolve_key_files`; removed
    when nnictl exits).
    """
    args = sys.argv if argv is None else argv
    name = Path(argv0 if argv0 is not None else (args[0] if args else "")).name
    if name not in ("nnictl", "nnictl.exe") or os.environ.get(HOOK_ENV, "1") == "0":
        return False
    where = _create_config_arg(args)
    settings = None
    if where is not None:
        try:
            settings = _load_config(Path(args[where]))
        except (OSError, ValueError, yaml.YAMLError):
            settings = None  # nnictl itself reports a config it cannot read
    os.environ.update(localhost_env(hosts=bind_hosts(settings) if settings is not None else (BIND_HOST,)))
    if settings is not None:
        resolved = resolve_key_files(Path(args[where]), settings, os.environ)
        if resolved is not None:
            args[where] = str(resolved)
            atexit.register(resolved.unlink, missing_ok=True)
    return True


def _create_config_arg(argv: Sequence[str]) -> int | None:
    """The index in ``argv`` of the config path of ``nnictl create --config PATH`` (or ``-c PATH``), else None."""
    if len(argv) < 2 or argv[1] != "create":
        return None
    for i, arg in enumerate(argv[2:-1], start=2):
        if arg in ("--config", "-c"):
            return i + 1
    return None


def hook_line() -> str:
    """The ``.pth`` line: imports this module only in ``nnictl`` processes; a failure is printed, never raised."""
    code = ("try:\n import os\n if os.path.basename(sys.argv[0] if sys.argv else '') in ('nnictl', 'nnictl.exe'):\n"
            "  from strategies.nni_local import apply_hook; apply_hook()\n"
            "except Exception as exc:\n print('paif nnictl hook:', exc, file=sys.stderr)")
    return f"import sys; exec({code!r})\n"


def _site_dir(site: str | Path | None) -> Path:
    return Path(site) if site is not None else Path(sysconfig.get_paths()["purelib"])


def install_hook(site: str | Path | None = None) -> Path:
    """Write the hook into ``site`` (default: this interpreter's site-packages)."""
    path = _site_dir(site) / HOOK_FILE
    path.write_text(hook_line())
    return path


def uninstall_hook(site: str | Path | None = None) -> bool:
    """Remove the hook; returns whether it was there."""
    path = _site_dir(site) / HOOK_FILE
    if path.is_file():
        path.unlink()
        return True
    return False


def _platform(config: dict[str, Any]) -> str | None:
    service = config.get("trainingService")
    return service.get("platform") if isinstance(service, dict) else None


def bind_hosts(config: dict[str, Any]) -> list[str]:
    """Where the manager of ``config`` listens: 127.0.0.1, plus ``nniManagerIp`` for a remote sweep."""
    hosts = [BIND_HOST]
    platform = _platform(config)
    ip = str(config.get("nniManagerIp") or "").strip()
    if platform == "remote" and ip and not _is_loopback(ip) and ip != "localhost":
        hosts.append(ip)
    return hosts


def free_port(host: str = BIND_HOST) -> int:
    """A currently free TCP port on ``host`` (NNI also needs port+1 free for some platforms)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with socket.socket() as s2:
            try:
                s2.bind((host, port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError(f"free_port: expected a free pair of ports on {host}, got none in 50 tries")


def _decode_address(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # IPv4, little-endian
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_addr)[::-1])
    raw = bytes.fromhex(hex_addr)  # IPv6: four little-endian 32-bit words
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets() -> list[tuple[str, int, int]]:
    """Every TCP socket in LISTEN state as ``(local address, port, inode)`` (from /proc/net/tcp and tcp6).

    The inode names the socket in ``/proc/<pid>/fd`` (``socket:[inode]``), i.e. which process listens.
    """
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A":
                found.append((_decode_address(addr), int(hex_port, 16), int(fields[9])))
    return found


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    return {addr for addr, p, _inode in listening_sockets() if p == port}


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def _load_config(config_path: Path) -> dict[str, Any]:
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected an NNI experiment config (a YAML mapping), "
                         f"got {type(config).__name__}")
    return config


def _working_directory(config_path: Path, home: str | None = None) -> Path:
    """The experiments folder of a config; ``~`` is ``home`` (the HOME nnictl runs with), default the user's."""
    config = _load_config(config_path)
    raw = str(config.get("experimentWorkingDirectory", "~/nni-experiments"))
    if home and (raw == "~" or raw.startswith("~/")):
        raw = home + raw[1:]
    path = Path(os.path.expanduser(raw))
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def resolve_key_files(config_path: Path, config: dict[str, Any], env: Mapping[str, str]) -> Path | None:
    """A copy of a remote config with the SSH keys of its machine list under the user's home, or None if not needed.

    nnictl runs with ``HOME`` = NNI's home (:func:`nni_home`, ``runs/``), so NNI would read ``sshKeyFile:
    ~/.ssh/id_ed25519`` (or its default ``~/.ssh/id_rsa`` when neither key nor password is given) from there. When
    ``env`` redirects ``HOME`` and a machine's key starts with ``~/``, the copy ``.<name>.paif-<pid>.yml`` is written
    beside ``config_path`` (relative paths in it keep their meaning) with ``~`` replaced by the user's home
    (``PAIF_USER_HOME``); the caller removes it when nnictl is done.
    """
    user_home = env.get(USER_HOME_ENV)
    if _platform(config) != "remote" or not user_home or env.get("HOME") == user_home:
        return None
    config = copy.deepcopy(config)
    machines = config["trainingService"].get("machineList")
    changed = False
    for machine in machines if isinstance(machines, list) else []:
        if not isinstance(machine, dict) or machine.get("password") is not None:
            continue
        key = str(machine.get("sshKeyFile", "~/.ssh/id_rsa"))
        if key == "~" or key.startswith("~/"):
            machine["sshKeyFile"] = user_home + key[1:]
            changed = True
    if not changed:
        return None
    resolved = config_path.with_name(f".{config_path.stem}.paif-{os.getpid()}.yml")
    tmp = resolved.with_name(resolved.name + ".tmp")
    tmp.write_text(f"# {config_path} with the SSH keys under {user_home} (strategies.nni_local.resolve_key_files)\n"
                   + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, resolved)
    return resolved


def _final_manager_status(log_file: Path) -> str | None:
    """The last status the manager reached before shutting down (DONE, ERROR, NO_MORE_TRIAL, RUNNING ...)."""
    if not log_file.is_file():
        return None
    statuses = [new for _old, new in _STATUS_CHANGE.findall(log_file.read_text(errors="replace"))
                if new not in ("STOPPING", "STOPPED")]
    return statuses[-1] if statuses else None


def experiment_summary(exp_dir: str | Path) -> dict[str, Any]:
    """Status of an experiment directory: manager status, trials (status, parameters, metric, result file)."""
    exp_dir = Path(exp_dir)
    db = exp_dir / "db" / "nni.sqlite"
    trials: dict[str, dict[str, Any]] = {}
    if db.is_file():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for _ts, trial, event, data, log_path, *_ in con.execute(
                    "SELECT * FROM TrialJobEvent ORDER BY timestamp"):
                t = trials.setdefault(trial, {"id": trial})
                t["status"] = event
                if log_path:
                    t["dir"] = log_path
                if data and event in ("WAITING", "RUNNING") and "parameters" not in t:
                    try:
                        t["parameters"] = json.loads(data).get("parameters")
                    except (ValueError, AttributeError):
                        pass
            for _ts, trial, _pid, kind, _seq, data in con.execute("SELECT * FROM MetricData ORDER BY timestamp"):
                if kind == "FINAL" and trial in trials:
                    value = json.loads(data)
                    trials[trial]["final"] = json.loads(value) if isinstance(value, str) else value
        finally:
            con.close()
    for t in trials.values():
        remote = _REMOTE_DIR.match(t.get("dir", ""))
        if remote:  # ran on another host: its outputs come back to trials/<id>/ (strategies.nni_remote)
            t["remote_dir"] = t["dir"]
            t["dir"] = str(exp_dir / "trials" / t["id"])
        result = Path(t.get("dir", "")) / "search" / "search_result.json"
        t["result"] = str(result) if result.is_file() else None
    status = _final_manager_status(exp_dir / "log" / "nnimanager.log")
    return {"experiment_id": exp_dir.name, "experiment_dir": str(exp_dir), "status": status,
            "trials": sorted(trials.values(), key=lambda t: t["id"])}


def _problems(summary: dict[str, Any]) -> list[str]:
    problems = []
    if summary["status"] != "DONE":
        problems.append(f"experiment status: expected DONE, got {summary['status']}")
    if not summary["trials"]:
        problems.append("trials: expected at least one, got none")
    for t in summary["trials"]:
        if t.get("status") != "SUCCEEDED":
            problems.append(f"trial {t['id']}: expected SUCCEEDED, got {t.get('status')} (see {t.get('dir')}/trial.log)")
        elif not t.get("result"):
            problems.append(f"trial {t['id']}: expected search/search_result.json in {t.get('dir')}, got none")
    listen = summary.get("listen")
    if listen is not None:
        allowed = summary.get("bind") or [BIND_HOST]
        if not listen:
            problems.append("manager: never saw its port listening")
        elif not set(listen) <= set(allowed):
            problems.append(f"manager: expected to listen on {', '.join(allowed)} only, got {sorted(listen)}")
    return problems


def _nnictl() -> str:
    exe = Path(sys.executable).parent / "nnictl"
    found = str(exe) if exe.is_file() else shutil.which("nnictl")
    if not found:
        raise FileNotFoundError("nnictl: expected it next to this Python or on PATH, got none; pip install nni==3.0")
    return found


def create(config: str | Path, port: int | None = None, timeout: float | None = None,
           echo: bool = True, fetch: bool = True, ssh_options: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
    """``nnictl create --config CONFIG --port PORT --foreground`` pinned to localhost; (exit code, summary).

    ``fetch`` (remote platform): copy every trial's ``search/`` back over SSH, with extra ``ssh -o``
    ``ssh_options`` (e.g. ``UserKnownHostsFile=...``); see :func:`strategies.nni_remote.fetch_outputs`.
    """
    config = Path(config).resolve()
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: expected an NNI experiment YAML, got no such file")
    port = port or free_port()
    settings = _load_config(config)
    if _platform(settings) == "remote" and not settings.get("nniManagerIp"):
        raise ValueError(f"{config}: nniManagerIp: expected this machine's IP address as the remote workers see it "
                         "(they dial ws://<nniManagerIp>:<port>), got none")
    hosts = bind_hosts(settings)
    env = localhost_env(hosts=hosts)
    workdir = _working_directory(config, env.get("HOME"))
    nni_config = resolve_key_files(config, settings, env) or config  # nnictl's HOME is runs/: keys spelled out
    try:
        cmd = [_nnictl(), "create", "--config", str(nni_config), "--port", str(port), "--foreground"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        exp_id: list[str] = []
        listen: set[str] = set()
        stop = threading.Event()

        def watch_port() -> None:  # sample the manager's listening addresses while it runs
            while not stop.is_set():
                listen.update(listening_addresses(port))
                stop.wait(0.5)

        watcher = threading.Thread(target=watch_port, daemon=True)
        watcher.start()
        start = time.monotonic()
        timed_out = False
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            m = re.search(r"Experiment ID: (\w+)", _ANSI.sub("", line))
            if m:
                exp_id.append(m.group(1))
            if timeout and time.monotonic() - start > timeout:
                timed_out = True
                break
        if timed_out:
            _stop_experiment(exp_id, port)
            proc.kill()
        rc = proc.wait()
        stop.set()
        watcher.join(timeout=2)
        if not exp_id:
            return (rc or 1), {"status": None, "trials": [],
                               "problems": [f"nnictl exited {rc} before an experiment id"]}
        fetch_problems: list[str] = []
        if fetch and _platform(settings) == "remote":
            from strategies.nni_remote import fetch_outputs  # the remote helpers build on this module

            fetch_problems = fetch_outputs(workdir / exp_id[0], settings, ssh_options)
        summary = experiment_summary(workdir / exp_id[0])
        summary["port"] = port
        summary["bind"] = hosts
        summary["listen"] = sorted(listen)
        summary["nnictl_exit_code"] = rc
        problems = fetch_problems + _problems(summary)
        if timed_out:
            problems.append(f"timeout: the experiment ran longer than {timeout} s and was stopped")
        summary["problems"] = problems
        (workdir / exp_id[0] / "paif_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return (1 if problems else 0), summary
    finally:
        if nni_config != config:
            nni_config.unlink(missing_ok=True)


def _stop_experiment(exp_id: list[str], port: int) -> None:
    args = [_nnictl(), "stop", exp_id[0]] if exp_id else [_nnictl(), "stop", "--port", str(port)]
    subprocess.run(args, env=localhost_env(), capture_output=True, timeout=60, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="nnictl create --foreground on 127.0.0.1, then check the outcome")
    c.add_argument("--config", required=True, help="NNI experiment YAML (e.g. search.yml)")
    c.add_argument("--port", type=int, default=None, help="manager port (default: a free one)")
    c.add_argument("--timeout", type=float, default=None, help="stop the experiment after this many seconds")
    c.add_argument("--no-fetch", action="store_true", help="remote platform: leave the trial outputs on the hosts")
    c.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                   help="remote platform: extra `ssh -o` option for fetching the outputs (repeatable)")
    k = sub.add_parser("check", help="summarise a finished experiment directory")
    k.add_argument("--experiment-dir", required=True)
    for name, text in (("install-hook", "make the plain `nnictl` of this environment bind 127.0.0.1 and keep its "
                                        "experiment index under runs/"),
                       ("uninstall-hook", "remove that hook"), ("hook-status", "where the hook is and what it does")):
        h = sub.add_parser(name, help=text)
        h.add_argument("--site", default=None, help="site-packages folder (default: this interpreter's)")
    args = parser.parse_args(argv)
    if args.command in ("install-hook", "uninstall-hook", "hook-status"):
        return _hook_command(args.command, args.site)
    if args.command == "create":
        try:
            rc, summary = create(args.config, args.port, args.timeout, fetch=not args.no_fetch,
                                 ssh_options=args.ssh_option)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        summary = experiment_summary(args.experiment_dir)
        summary["problems"] = _problems(summary)
        rc = 1 if summary["problems"] else 0
    print(json.dumps(summary, indent=2))
    for problem in summary.get("problems", []):
        print(f"error: {problem}", file=sys.stderr)
    return rc


def _hook_command(command: str, site: str | None) -> int:
    path = _site_dir(site) / HOOK_FILE
    if command == "install-hook":
        print(f"installed {install_hook(site)}: `nnictl` in this environment binds {BIND_HOST} and keeps NNI's "
              f"experiment index in {nni_home()}/nni-experiments/ ({NNI_HOME_ENV} overrides, {HOOK_ENV}=0 disables)")
    elif command == "uninstall-hook":
        print(f"removed {path}" if uninstall_hook(site) else f"no hook at {path}")
    else:
        installed = path.is_file() and path.read_text() == hook_line()
        print(json.dumps({"hook": str(path), "installed": installed, "nni_home": str(nni_home()),
                          "bind_host": BIND_HOST}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
