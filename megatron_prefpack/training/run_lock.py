"""One run per directory: a lock file that a second job sees at once and a dead job leaves stale.

``<dir>/.prefpack.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local and network
file systems, unlike ``flock`` on Lustre/NFS mounts without lock support) and holds who owns it:
host, pid, Slurm job id, start time. The owner touches it every ``heartbeat_s`` seconds. A lock
is stale, and is taken over with a message, when

* its owner ran on this host and that pid no longer exists, or
* it belongs to this Slurm job (a requeued job: Slurm ended the earlier incarnation), or
* its heartbeat is older than ``stale_after_s`` (a node that died with the job on it).

Anything else is a live run: :class:`RunLockError` names the holder and the lock file.
The lock is removed on release; a process killed with SIGKILL leaves it, to be found stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".prefpack.lock"


class RunLockError(RuntimeError):
    """Another live run holds the directory."""


def _owner() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.time(),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict[str, object], age_s: float, stale_after_s: float) -> str | None:
    """Why the lock of ``holder`` (last heartbeat ``age_s`` ago) is stale, or None if it is live."""
    me = _owner()
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        if holder["pid"] == me["pid"]:
            return "held by this very process"
        if not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on {holder['host']} is gone"
    if me["slurm_job_id"] is not None and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it belongs to an earlier incarnation of Slurm job {me['slurm_job_id']}"
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s:.0f} s"
    return None


class RunLock:
    """Exclusive ownership of ``directories`` for the life of a run (use as a context manager).

    Acquisition raises :class:`RunLockError` when a live run holds any of them; locks already
    taken are released first. ``notes`` collects what was found stale and taken over."""

    def __init__(self, directories: list[Path], heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.paths = [Path(d) / LOCK_NAME for d in dict.fromkeys(Path(d).resolve() for d in directories)]
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.notes: list[str] = []
        self._held: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(_owner(), handle)
        return True

    def _acquire_one(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a racing run may remove or create the file between our calls
            if self._try_create(path):
                self._held.append(path)
                return
            try:
                text = path.read_text()
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            try:
                holder = json.loads(text)
            except json.JSONDecodeError:
                holder = {}
            reason = stale_reason(holder, age, self.stale_after_s) if holder else "it is unreadable"
            if reason is None:
                raise RunLockError(
                    f"{path}: another run is using this directory (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, Slurm job {holder.get('slurm_job_id')}, heartbeat "
                    f"{age:.0f} s ago); wait for it to end, or give this run its own run.dir / "
                    "checkpoint.save"
                )
            self.notes.append(f"took over the stale lock {path}: {reason}")
            path.unlink(missing_ok=True)
        raise RunLockError(f"{path}: could not take the lock (another run keeps recreating it)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for path in self._held:
                # A vanished file needs nothing from us: the next acquirer simply creates one.
                with contextlib.suppress(OSError):
                    os.utime(path)

    def acquire(self) -> None:
        """Take every lock or none (raises :class:`RunLockError`); starts the heartbeat."""
        try:
            for path in self.paths:
                self._acquire_one(path)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="prefpack-run-lock", daemon=True)
        self._thread.start()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock files this object holds (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for path in self._held:
            path.unlink(missing_ok=True)
        self._held = []

    def __exit__(self, *exc: object) -> None:
        self.release()
