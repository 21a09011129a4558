"""Running the two listeners under gunicorn, each in its own process tree.

Why two gunicorn arbiters: TLS is a per-server setting in gunicorn, and the admin listener may serve TLS while
the guest listener must serve plain HTTP on 169.254.169.254:80. The guest listener uses gevent workers,
because each held long-poll then costs a greenlet (~20 KiB) rather than a thread, and a change for 1,000
waiting droplets is answered from one loop per process (measured on a 2-vCPU machine: one change reached 2,000
long-polls held by one gevent worker in 217 ms p50, at about 20 KiB each, where a threaded worker took twice
as long and 32 KiB; docs/benchmarks.md). The admin listener runs one gevent worker too (``admin_worker.py``: a
slow or idle connection must not hold a thread the engine needs). The supervisor (``serve``) binds both
sockets itself so a port in use is one clear error before anything starts, then hands the file descriptors to
the arbiters with gunicorn's ``fd://`` binds. Every process of the tree ends when its parent does
(``lifeline.py``), so nothing outlives a ``kill -9`` of ``serve``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from .config import MULTIPROC_ENV, Listen, ServerConfig
from .errors import ListenError
from .lifeline import die_with_parent

log = logging.getLogger(__name__)

# Held long-polls are answered at once on SIGTERM (gevent_worker.py), so the graceful wait only covers
# requests in flight (milliseconds) and idle keep-alive connections, which need not hold shutdown up.
GRACEFUL_TIMEOUT_S = 2
GUEST_WORKER_CONNECTIONS = 10_000
FD_SLACK = 1_024  # the state file, the metrics files, logs, gunicorn's own pipes
# An arbiter whose supervisor died stops gracefully (held long-polls are answered); a worker whose arbiter
# died is killed outright, as its arbiter can no longer coordinate anything.
# Settings older gunicorn versions (>= 22 is supported) do not know: skipped there.
_NEWER_SETTINGS = frozenset({"control_socket_disable"})
ARBITER_PDEATHSIG = signal.SIGTERM
WORKER_PDEATHSIG = signal.SIGKILL


def bind(listen: Listen, what: str) -> socket.socket:
    """Bind and listen now, so a port in use fails before any process starts."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = {
            errno.EADDRINUSE: "address already in use",
            errno.EADDRNOTAVAIL: "address not configured on this host",
            errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        }.get(e.errno or 0, e.strerror or str(e))
        raise ListenError(f"{what} {listen}: {reason}") from e
    sock.set_inheritable(True)
    return sock


def _gunicorn_child(options: dict[str, Any], load: Callable[[], Any]) -> None:
    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if key in self.cfg.settings or key not in _NEWER_SETTINGS:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return load()

    _Server().run()


def _common_options(config: ServerConfig, fd: int, name: str) -> dict[str, Any]:
    return {
        "bind": [f"fd://{fd}"],
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        "loglevel": "warning" if config.log_level == "info" else config.log_level,
        "errorlog": "-",
        "logger_class": "metadata_server.gunicorn_log.PropagatingLogger",  # the server's log format
        "proc_name": f"metadata-server-{name}",
        "child_exit": _mark_dead,
        "post_fork": _worker_dies_with_arbiter,
        "keepalive": 75,
        # gunicorn >= 25.1 opens a control socket at one per-user path ($HOME/.gunicorn/gunicorn.ctl) for
        # every arbiter: our two arbiters (and any other server's) would take it from each other, and
        # `serve` is the one supervisor anyway.
        "control_socket_disable": True,
    }


def _worker_dies_with_arbiter(_server: Any, worker: Any) -> None:
    die_with_parent(worker.ppid, WORKER_PDEATHSIG)


def _mark_dead(_server: Any, worker: Any) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def run_guest(config: ServerConfig, fd: int) -> None:
    from .app import create_guest_app
    from .guest import GuestSettings

    settings = GuestSettings(max_waits_per_droplet=config.max_waits_per_droplet)
    options = _common_options(config, fd, "guest") | {
        "workers": config.workers,
        "worker_class": "metadata_server.gevent_worker.GuestWorker",
        "worker_connections": GUEST_WORKER_CONNECTIONS,
        "timeout": 30,
    }
    _gunicorn_child(options, lambda: create_guest_app(config.db_path, settings))


def run_admin(config: ServerConfig, fd: int) -> None:
    from .admin_worker import REQUEST_HEAD_TIMEOUT_S, WORKER_CONNECTIONS, admin_worker_class
    from .app import create_app

    cert = None if config.tls_cert is None else str(config.tls_cert)
    key = None if config.tls_key is None else str(config.tls_key)
    options = _common_options(config, fd, "admin") | {
        "workers": 1,
        # TLS is the worker's job (see admin_worker.py), not gunicorn's certfile/keyfile.
        "worker_class": admin_worker_class(cert, key),
        "worker_connections": WORKER_CONNECTIONS,
        "keepalive": REQUEST_HEAD_TIMEOUT_S,
        "sendfile": False,  # never write plain bytes around the worker's TLS socket
        "timeout": 30,
    }
    _gunicorn_child(options, lambda: create_app(config.db_path, config.admin_token))


def _fork_listener(
    name: str, target: Callable[[ServerConfig, int], None], config: ServerConfig, fd: int
) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0  # pragma: no cover - below runs in the child
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent(parent, ARBITER_PDEATHSIG)
        target(config, fd)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        log.exception("%s listener crashed", name)
        code = 1
    finally:
        os._exit(code)


def _supervise(children: dict[int, str]) -> int:
    """Wait for the listeners; SIGTERM/SIGINT stop both; one dying alone stops the other (exit 1)."""
    stopping = False

    def stop_all(_signum: int = 0, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        name = children.pop(pid, "?")
        if not stopping:
            log.error("the %s listener exited unexpectedly (status %s); stopping", name, status)
            exit_code = 1
            stop_all()
    return exit_code


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files (inherited by every child) to what the pools need.

    systemd and most shells start services with a soft limit of 1,024 descriptors, while a guest worker
    holds up to ``GUEST_WORKER_CONNECTIONS`` connections and the admin worker ``WORKER_CONNECTIONS``: past
    the limit ``accept()`` fails for every client. The hard limit is the ceiling; returns the new soft limit.
    """
    from .admin_worker import WORKER_CONNECTIONS

    wanted = GUEST_WORKER_CONNECTIONS + WORKER_CONNECTIONS + FD_SLACK
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open files limited to %d (hard limit); a worker may hold up to %d connections: "
            "raise LimitNOFILE / ulimit -Hn",
            soft,
            wanted,
        )
    return soft


def serve(config: ServerConfig, announce: Callable[[str], None]) -> int:
    """Run both listeners until SIGTERM/SIGINT; returns the exit code."""
    raise_open_files_limit()
    guest_sock = bind(config.guest_listen, "--guest-listen")
    try:
        admin_sock = bind(config.admin_listen, "--admin-listen")
    except ListenError:
        guest_sock.close()
        raise
    metrics_dir = tempfile.mkdtemp(prefix="metadata-server-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        children = {
            _fork_listener("guest", run_guest, config, guest_sock.fileno()): "guest",
            _fork_listener("admin", run_admin, config, admin_sock.fileno()): "admin",
        }
        guest_sock.close()
        admin_sock.close()
        announce(
            f"metadata-server: guest listener http://{config.guest_listen}, "
            f"admin listener {config.admin_scheme}://{config.admin_listen}, state {config.db_path}"
        )
        return _supervise(children)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
