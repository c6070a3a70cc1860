"""Long jobs (orbits, diffusion, reconstruction) in a separate process: JSON-lines progress, polling, tree cancel.

The host (Slicer's GUI thread, a script, a test) starts a worker command, e.g. ``[PythonSlicer, SVDRRWorker.py,
job.json]``, and calls :meth:`Job.poll` from a timer: it never blocks, because two reader threads move the
worker's stdout and stderr lines into a queue. Nothing here touches Qt or MRML, so callbacks into the scene stay on
the caller's thread.

Worker protocol (version 1): one JSON object per line on the worker's stdout, each with a ``type``:

- ``{"type": "progress", "fraction": 0..1, "message": str}``
- ``{"type": "log", "level": "debug"|"info"|"warning"|"error", "message": str}``
- ``{"type": "result", "outputs": [path, ...], ...task-specific keys}``: the job succeeded
- ``{"type": "error", "message": str, "detail": str}``: the job failed (the worker then exits with code 1)

A stdout line that is not a JSON object becomes a ``log`` event (``"stream": "stdout"``); every stderr line
becomes a ``log`` event with ``"stream": "stderr"`` and the last ones are kept for crash reports. When the job
ends, :meth:`Job.poll` returns one last event ``{"type": "exit", "state", "returncode", "message"}``.

States: ``pending`` (not started), ``running``, then one of ``finished`` (exit code 0 and a result event),
``failed`` (an error event, a non-zero exit code, or no result; :attr:`Job.error` says why, with the stderr tail
for a crash) and ``cancelled``.

Cancel ends the whole process tree, because a worker may start children (Slicer's ``PythonSlicer`` is itself a
launcher that starts the real interpreter). On POSIX the worker is started in a new session, so it leads its own
process group: :meth:`Job.cancel` sends SIGTERM to that group, waits, then SIGKILLs what is left. When ``psutil`` is
importable it is used in addition, to reach descendants that left the group (``setsid``) and on Windows, where
without psutil ``taskkill /T /F`` is used. :data:`TREE_KILL` names the method in use.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

try:  # optional: finds descendants outside the process group, and is the clean way on Windows
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

PROTOCOL_VERSION = 1
PENDING, RUNNING, FINISHED, FAILED, CANCELLED = "pending", "running", "finished", "failed", "cancelled"
DONE_STATES = (FINISHED, FAILED, CANCELLED)
EVENT_TYPES = ("progress", "log", "result", "error")
_POSIX = os.name == "posix"
TREE_KILL = ("psutil + process group" if _POSIX else "psutil") if psutil is not None else (
    "process group" if _POSIX else "taskkill")


class JobError(RuntimeError):
    """A job that cannot be started or is used out of order."""


class Job:
    """One worker process. ``Job(argv).start()``, then ``poll()`` until ``done``; ``cancel()`` at any time.

    ``linger`` is how long to wait, once the worker has exited, for its stdout/stderr to close: a descendant that
    inherited them and outlives the worker is ended after that, so a job always ends. ``use_psutil=False`` forces
    the process-group method (tests use it to check both).
    """

    def __init__(self, argv: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, linger: float = 2.0, stderr_lines: int = 50,
                 use_psutil: bool | None = None):
        if not argv:
            raise JobError("a job needs a command to run")
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("PYTHONIOENCODING", "utf-8")
        self.cwd = None if cwd is None else os.fspath(cwd)
        self.linger = float(linger)
        self.use_psutil = psutil is not None if use_psutil is None else bool(use_psutil and psutil is not None)
        self.state = PENDING
        self.returncode: int | None = None
        self.fraction = 0.0          # last reported progress fraction
        self.message = ""            # last progress message
        self.result: dict | None = None   # the result event
        self.error: str | None = None     # why the job failed (error event message, or exit code + stderr tail)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._exited_at: float | None = None
        self._cancel_requested = False
        self._pending: list[dict] = []
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    @property
    def outputs(self) -> list[str]:
        return list((self.result or {}).get("outputs", []))

    def start(self) -> "Job":
        if self.state != PENDING:
            raise JobError(f"job already {self.state}")
        kwargs: dict[str, Any] = {}
        if _POSIX:
            kwargs["start_new_session"] = True  # own process group (and session): the unit cancel() ends
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        except OSError as exc:
            raise JobError(f"cannot start {self.argv[0]}: {exc}") from exc
        self.state = RUNNING
        self._open_streams = 2
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            threading.Thread(target=_pump, args=(stream, name, self._queue), daemon=True,
                             name=f"svdrr-job-{self._proc.pid}-{name}").start()
        return self

    def poll(self) -> list[dict]:
        """New events since the last call (never blocks). The last one of a job is its ``exit`` event."""
        with self._lock:
            events, self._pending = self._pending, []
            self._drain(events, block=0.0)
            return events

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Block until the job is done and return every event not yet polled; TimeoutError leaves it running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[dict] = []
        while True:
            with self._lock:
                events += self._pending
                self._pending = []
                self._drain(events, block=0.05)
            if self.done or self.state == PENDING:
                return events
            if deadline is not None and time.monotonic() > deadline:
                with self._lock:
                    self._pending = events + self._pending
                raise TimeoutError(f"job {self.argv} still running after {timeout} s")

    def cancel(self, grace: float = 3.0) -> None:
        """End the worker and all its descendants (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it.

        Returns once the worker is gone; the state is then ``cancelled`` (unless the job had already ended).
        """
        with self._lock:
            if self.state != RUNNING:
                return
            self._cancel_requested = True
            self._kill_tree(grace)
            # every holder of the pipes is gone: collect the remaining output and settle the state now
            deadline = time.monotonic() + max(self.linger, 1.0)
            while not self.done and time.monotonic() < deadline:
                self._drain(self._pending, block=0.05)
            if not self.done:
                self._finish(self._pending)

    def __enter__(self) -> "Job":
        return self if self.state != PENDING else self.start()

    def __exit__(self, *exc) -> None:
        self.cancel()

    # -- internals ------------------------------------------------------------------------------------------
    def _drain(self, events: list[dict], block: float) -> None:
        if self.state != RUNNING:
            return
        try:
            item = self._queue.get(timeout=block) if block > 0 else self._queue.get_nowait()
            while True:
                self._handle(item, events)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        rc = self._proc.poll()
        if rc is None:
            return
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        if self._open_streams > 0 and time.monotonic() - self._exited_at < self.linger:
            return  # the rest of the output is still on its way
        if self._open_streams > 0:
            # the worker is gone but a descendant still holds its pipes: the job is over, end the stragglers
            self._signal_group(signal.SIGKILL if _POSIX else None)
        self._finish(events)

    def _handle(self, item: tuple[str, bytes | None], events: list[dict]) -> None:
        stream, raw = item
        if raw is None:
            self._open_streams -= 1
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if stream == "stderr":
            self.stderr_tail.append(line)
            if line.strip():
                events.append({"type": "log", "level": "info", "stream": "stderr", "message": line})
            return
        event = _parse_event(line)
        if event is None:
            if line.strip():
                events.append({"type": "log", "level": "info", "stream": "stdout", "message": line})
            return
        kind = event["type"]
        if kind == "progress":
            self.fraction = event["fraction"]
            self.message = event.get("message", self.message)
        elif kind == "result":
            self.result = event
        elif kind == "error" and self.error is None:
            self.error = event["message"]
        events.append(event)

    def _finish(self, events: list[dict]) -> None:
        rc = self._proc.wait()
        self.returncode = rc
        if self._cancel_requested:
            self.state, message = CANCELLED, "cancelled"
        elif self.error is not None:
            self.state, message = FAILED, self.error
        elif rc != 0:
            self.state = FAILED
            self.error = message = f"the worker ended with {_describe_exit(rc)} without reporting an error" + \
                _tail_text(self.stderr_tail)
        elif self.result is None:
            self.state = FAILED
            self.error = message = "the worker ended without a result" + _tail_text(self.stderr_tail)
        else:
            self.state, message = FINISHED, "finished"
        events.append({"type": "exit", "state": self.state, "returncode": rc, "message": message})

    def _kill_tree(self, grace: float) -> None:
        pid = self._proc.pid
        others = []
        if self.use_psutil:
            try:
                others = psutil.Process(pid).children(recursive=True)  # snapshot before anything dies
            except psutil.Error:
                others = []
        self._signal_group(signal.SIGTERM if _POSIX else None)
        for p in others:
            _quietly(p.terminate)
        if not _POSIX and psutil is None:  # pragma: no cover - Windows without psutil
            subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True)
        elif not _POSIX:  # pragma: no cover
            _quietly(self._proc.terminate)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # whatever ignored SIGTERM (or was slower than the worker) is killed now
        self._signal_group(signal.SIGKILL if _POSIX else None)
        if others:
            _, alive = psutil.wait_procs(others, timeout=0.2 if self._proc.poll() is not None else grace)
            for p in alive:
                _quietly(p.kill)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def _signal_group(self, sig) -> None:
        """Signal the worker's process group (POSIX); the group outlives the worker while any member lives."""
        if not _POSIX or sig is None:
            if self.use_psutil:  # pragma: no cover - Windows
                try:
                    for p in psutil.Process(self._proc.pid).children(recursive=True):
                        _quietly(p.kill)
                except psutil.Error:
                    pass
            return
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_job(argv: Sequence[str | os.PathLike], **kwargs) -> Job:
    """``Job(argv, **kwargs).start()``."""
    return Job(argv, **kwargs).start()


def write_job_file(spec: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a job description as JSON (what the worker reads) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _pump(stream, name: str, q: queue.Queue) -> None:
    """Reader thread: every line of one pipe into the queue, then None at end of file."""
    try:
        for raw in iter(stream.readline, b""):
            q.put((name, raw))
    except (OSError, ValueError):  # pragma: no cover - the pipe broke
        pass
    finally:
        try:
            stream.close()
        except OSError:  # pragma: no cover
            pass
        q.put((name, None))


def _parse_event(line: str) -> dict | None:
    """A protocol event from one stdout line, or None when the line is not one."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        return None
    if event["type"] == "progress":
        try:
            event["fraction"] = min(1.0, max(0.0, float(event.get("fraction", 0.0))))
        except (TypeError, ValueError):
            return None
        event["message"] = str(event.get("message", ""))
    elif event["type"] in ("error", "log"):
        event["message"] = str(event.get("message", ""))
        if event["type"] == "log":
            event.setdefault("level", "info")
    elif event["type"] == "result":
        outputs = event.get("outputs", [])
        event["outputs"] = [str(p) for p in outputs] if isinstance(outputs, list) else []
    return event


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _tail_text(lines) -> str:
    tail = [line for line in lines if line.strip()]
    return ("; last lines of its error output:\n" + "\n".join(tail)) if tail else " (no error output)"


def _quietly(action) -> None:
    try:
        action()
    except Exception:  # the process is already gone
        pass
