"""Child processes that end when their parent does, however the parent died (``kill -9`` included).

``serve`` forks two gunicorn arbiters and each arbiter forks its workers. Without this, killing ``serve`` with
SIGKILL left both arbiters and their workers running and serving: a supervisor's restart could not bind the
ports, and a restart test could pass against the orphans. Linux's ``PR_SET_PDEATHSIG`` makes the kernel signal
a child when its parent dies; it is set in the child right after ``fork()``, and the parent is checked once
more afterwards because it may have died in between (the signal is then never sent).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
EXIT_ORPHANED = 1


def die_with_parent(parent_pid: int, sig: int) -> None:
    """Have the kernel send ``sig`` to this process when ``parent_pid`` (its parent) dies.

    Call it in the child right after ``fork()``. If the parent is already gone the child exits at once.
    Elsewhere than Linux only that check is made.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)
