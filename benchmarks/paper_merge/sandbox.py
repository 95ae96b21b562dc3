"""Run a generated Python function against hidden unit tests in a separate, locked-down process.

Each call gets a fresh temporary sandbox directory (the child's working directory, removed afterwards)
and a child interpreter (``python -I``: no user site, no environment variables) that, before running the
candidate, installs an audit hook (PEP 578, cannot be removed from Python) refusing

- any ``open`` for writing outside the sandbox directory, and file-system changes (remove, rename,
  mkdir, chmod, links, ...) outside it;
- sockets (creation, connect, bind), subprocesses, ``os.system``/``exec``/``fork``/``kill``, and
  ``ctypes`` (which could bypass the hook);

with resource limits (CPU seconds, address space, file size, open files) and a wall-clock timeout.
Any failure (syntax error, exception, refused action, timeout, wrong answer, crash) makes the item
fail; :func:`run_tests` never raises for what the candidate does.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HARNESS = r"""
import json, os, sys
sandbox = os.path.realpath(os.getcwd())
payload = json.loads(sys.stdin.read())
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "os.startfile", "webbrowser.", "urllib.",
           "http.", "ftplib.", "smtplib.", "os.putenv", "os.unsetenv", "resource.setrlimit",
           "sys.addaudithook")
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.chmod": 1,
               "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
               "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2, "os.chdir": 1, "os.chroot": 1}

def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(sandbox, path))
    return full == sandbox or full.startswith(sandbox + os.sep)

def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} refused")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing {path} refused")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"sandbox: {event} {path} refused")

import io, contextlib
sys.addaudithook(hook)
passed = 0
error = ""
try:
    namespace = {"__name__": "candidate"}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(payload["source"], "candidate.py", "exec"), namespace)
        function = namespace[payload["entry"]]
        for args, expected in payload["tests"]:
            if function(*args) == expected:
                passed += 1
except BaseException as exc:  # the candidate's failure, whatever it is, is a failed item
    error = f"{type(exc).__name__}: {exc}"[:300]
sys.__stdout__.write("\n" + json.dumps({"passed": passed, "error": error}) + "\n")
sys.__stdout__.flush()
"""


@dataclass(frozen=True)
class Outcome:
    """``passed`` of ``total`` tests; ``error``: why the run stopped early ("" when it did not)."""

    passed: int
    total: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total and not self.error


def _limits(cpu_seconds: int, memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_tests(
    source: str,
    entry: str,
    tests: list | tuple,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
) -> Outcome:
    """Run ``source``, then ``entry(*args) == expected`` for each ``(args, expected)`` of ``tests``, in a
    sandboxed child process (module docstring); a timeout after ``timeout`` seconds of wall clock."""
    payload = json.dumps({"source": source, "entry": entry, "tests": [[list(a), e] for a, e in tests]})
    with tempfile.TemporaryDirectory(prefix="wpatch-sandbox-") as sandbox:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", HARNESS],
                input=payload,
                capture_output=True,
                text=True,
                cwd=sandbox,
                env={"PATH": "/usr/bin:/bin"},
                timeout=timeout,
                preexec_fn=lambda: _limits(max(1, int(timeout)), memory_mb << 20),
            )
        except subprocess.TimeoutExpired:
            return Outcome(0, len(tests), f"timeout after {timeout:g} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines and proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        # the CPU-seconds limit (soft: SIGXCPU, hard: SIGKILL) ended it before the wall clock did
        return Outcome(0, len(tests), f"timeout: CPU limit of {max(1, int(timeout))} s")
    if not lines:
        return Outcome(0, len(tests), f"child exited with {proc.returncode}: {proc.stderr.strip()[-200:]}")
    result = json.loads(lines[-1])
    return Outcome(int(result["passed"]), len(tests), result["error"])
