"""Checks of a config against the machine it will run on: what makes the root daemon unsafe or useless.

The agent runs as root and executes the programs its config names. Like sshd with its ``authorized_keys`` and
``AuthorizedKeysCommand``, it refuses a config file or a hook program that someone else could change:

* the file itself world-writable, or owned by a user other than root (or the user the agent runs as);
* a directory on the way to it world-writable without the sticky bit (anyone could swap the file), or owned
  by another user. A sticky world-writable directory such as ``/tmp`` only lets each user replace their own
  entries, so it is allowed as an ancestor.

And a program that does not exist (or is not executable) is refused at once rather than at the first
migration. Only ``argv[0]`` is checked: an interpreter's script argument is the owner's business.

Checked by :func:`guest_agent.config.load_config` (so by ``run``, ``check-config``, ``simulate`` and a SIGHUP
reload), not by :func:`~guest_agent.config.parse_config`, which only reads text.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from guest_agent.config import (
    AgentConfig,
    CommandHookSpec,
    NestedVMsHookSpec,
    RestartMethod,
    SystemdHookSpec,
)
from guest_agent.errors import ConfigError


def check_config_file(path: Path, *, source: str) -> None:
    """Refuse a config file that another user could change (see the module docstring)."""
    problem = unsafe_path(path)
    if problem is not None:
        raise ConfigError(f"refusing an unsafe config file: {problem}", source=source)


def check_installation(config: AgentConfig, *, environ: Mapping[str, str]) -> None:
    """Refuse hook programs and a power-off command that do not exist or that another user could change."""
    source = config.source
    default_path = environ.get("PATH", os.defpath)
    for phase, specs in config.hooks.items():
        for i, spec in enumerate(specs):
            where = f"{phase.value}[{i}]"
            if isinstance(spec, CommandHookSpec):
                if spec.cwd is not None and not Path(spec.cwd).is_dir():
                    raise ConfigError(f"no such directory: {spec.cwd}", key=f"{where}.cwd", source=source)
                search = dict(spec.env).get("PATH", default_path)  # what the hook's exec will search
                _check_program(spec.command[0], f"{where}.command", source, search, spec.cwd)
            elif isinstance(spec, SystemdHookSpec):
                _check_program(spec.systemctl[0], f"{where}.systemctl", source, default_path, None)
            elif (
                isinstance(spec, NestedVMsHookSpec)
                and spec.restart is RestartMethod.COMMAND
                and "{domain}" not in spec.command[0]
            ):
                _check_program(spec.command[0], f"{where}.command", source, default_path, None)
    _check_program(config.agent.power_off_command[0], "agent.power_off_command", source, default_path, None)


def _check_program(program: str, key: str, source: str | None, search_path: str, cwd: str | None) -> None:
    resolved = find_program(program, search_path, cwd)
    if resolved is None:
        where = "" if "/" in program else f" on PATH ({search_path})"
        raise ConfigError(f"no such program: {program}{where}", key=key, source=source)
    if not os.access(resolved, os.X_OK) or not resolved.is_file():
        raise ConfigError(f"not an executable file: {resolved}", key=key, source=source)
    problem = unsafe_path(resolved)
    if problem is not None:
        raise ConfigError(f"refusing an unsafe program: {problem}", key=key, source=source)


def find_program(program: str, search_path: str, cwd: str | None) -> Path | None:
    """Where exec would find ``program``: a path as given (relative to ``cwd``), or a name on the PATH."""
    if "/" in program:
        path = Path(program)
        if not path.is_absolute():
            if cwd is None:
                return None  # relative to whatever directory the daemon happens to run in: refuse
            path = Path(cwd) / path
        return path if path.exists() else None
    found = shutil.which(program, path=search_path)
    return Path(found) if found is not None else None


def unsafe_path(path: Path) -> str | None:
    """Why ``path`` could be changed by a user other than root or us, or None when it cannot."""
    real = Path(os.path.realpath(path))
    problem = _unsafe_entry(real, directory=False)
    if problem is not None:
        return problem
    # Every directory on the way, for the path as written (its symlinks live there) and for the real one.
    seen: set[Path] = set()
    for start in (Path(os.path.abspath(path)), real):
        for directory in start.parents:
            if directory not in seen:
                seen.add(directory)
                problem = _unsafe_entry(directory, directory=True)
                if problem is not None:
                    return f"{problem} (on the way to {path})"
    return None


def _unsafe_entry(path: Path, *, directory: bool) -> str | None:
    try:
        st = path.stat()
    except OSError as e:
        return f"{path}: {e.strerror}"
    # A sticky world-writable directory (/tmp) lets others replace only their own entries.
    sticky_ok = directory and bool(st.st_mode & stat.S_ISVTX)
    if st.st_mode & stat.S_IWOTH and not sticky_ok:
        return f"{path} is world-writable (chmod o-w {path})"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    return None
