"""Child processes that stop with their parent: `mlxmoe demo`'s nodes and router, `mlxmoe up`'s node.

Three ways a child learns that its parent is gone (docs/ARCHITECTURE.md, ui):
 1. the parent's SIGINT/SIGTERM/SIGHUP handler kills every child's process group;
 2. Linux: prctl(PR_SET_PDEATHSIG, SIGTERM), set between fork and exec, so even
    SIGKILL of the parent sends the children SIGTERM;
 3. everywhere (macOS has no PDEATHSIG): each child holds the read end of a pipe
    whose only write end the parent holds; a watchdog thread in the child reads it,
    and EOF (the parent exited, however) makes the child SIGTERM itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlxmoe.errors import MlxMoeError

PARENT_PIPE_ENV = "MLXMOE_PARENT_PIPE"
PR_SET_PDEATHSIG = 1
# Run by each child before the command line: start the watchdog, then `mlxmoe ...`.
CHILD_BOOT = ("import sys, runpy; from mlxmoe.children import watch_parent; watch_parent(); "
              "sys.argv[0] = 'mlxmoe'; runpy.run_module('mlxmoe.cli', run_name='__main__')")


def watch_parent() -> None:
    """In a child: if $MLXMOE_PARENT_PIPE names a pipe, SIGTERM ourselves when
    it reaches EOF (the parent died), and exit hard if SIGTERM did not end us."""
    import threading

    fd = os.environ.pop(PARENT_PIPE_ENV, None)
    if not fd or not fd.isdigit():
        return

    def watch():
        try:
            while os.read(int(fd), 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="mlxmoe-parent-watch", daemon=True).start()


def _pdeathsig(parent: int):
    """preexec_fn (Linux): SIGTERM when the parent dies; exit if it already has."""
    import ctypes

    try:  # looked up here: between fork and exec nothing may import or allocate much
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec



def last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Children:
    """A parent's child processes (the demo's nodes and router, `mlxmoe up`'s node), each in its own
    process group. `owner` names the parent in check()'s errors."""

    def __init__(self, owner: str = "demo"):
        self.owner = owner
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}  # pid -> its log
        self._r, self._w = os.pipe()  # the parent holds the only write end

    def check(self) -> None:
        """MlxMoeError naming the first child that exited, with its log's last line."""
        for p in self.procs:
            if p.poll() is None:
                continue
            args = [str(a) for a in p.args[3:]]
            what = ("router" if args[:1] == ["serve"] else
                    f"node {args[args.index('--group') + 1]}" if "--group" in args[:-1] else " ".join(args[:2]))
            log = self.logs.get(p.pid)
            if p.returncode < 0:
                why = f"was killed by signal {-p.returncode}"
            else:  # its own error is its log's last line
                tail = last_line(log).removeprefix("Error: ") if log else ""
                why = f"exited (exit code {p.returncode})" + (f": {tail}" if tail else "")
            raise MlxMoeError(f"the {self.owner}'s {what} {why}" + (f"; log: {log}" if log else ""))

    def start(self, cmd: list[str], log: Path, boot: str | None = None, env: dict | None = None,
              mode: str = "w") -> subprocess.Popen:
        """Run `boot` (default: CHILD_BOOT, i.e. `mlxmoe CMD`) with `cmd` as its arguments, `env` added to
        ours, output to `log` (opened with `mode`)."""
        env = {**os.environ, **(env or {}), PARENT_PIPE_ENV: str(self._r)}
        with open(log, mode) as out:
            p = subprocess.Popen([sys.executable, "-c", boot or CHILD_BOOT, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env, pass_fds=(self._r,),
                                 preexec_fn=_pdeathsig(os.getpid()) if sys.platform.startswith("linux") else None)
        self.procs.append(p)
        self.logs[p.pid] = log
        return p

    def stop(self, grace: float = 10) -> None:
        """SIGTERM every child's group, SIGKILL what is left after `grace` s."""
        for p in self.procs:
            _killpg(p, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p, signal.SIGKILL)
                p.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


def _killpg(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)  # its own group: whatever it started goes too
    except (ProcessLookupError, PermissionError):
        pass
