"""Verifiers that read model output, run in a child process under memory and CPU limits.

Why a process: math-verify hands model output to sympy, and some answers never finish. Measured here:
`\\boxed{9^{9^{9^{9}}}}` on a thread other than the main one (where math-verify's SIGALRM timeouts are off) ran
for 10 minutes without end while holding the GIL, so the whole actor froze, its own timeout included;
`\\boxed{2^{2^{2^{2^{2^{2}}}}}}` grew past 1.6 GB in 30 s. A thread can be neither killed nor capped; a process
can. In the child the verifier runs on the main thread, so math-verify's own 5 s timeouts apply (as they do for
`Task.score` called directly), and the child's address space is capped (RLIMIT_AS), so a runaway parse meets a
MemoryError instead of the machine's OOM killer.

`python -m actors.verifier_sandbox --memory-mb M --cpu-s C` speaks JSON lines (never pickle) on stdin/stdout:
the first line in is the task config (`TaskConfig.model_dump_json()`); the child builds the task with
`build_task`, which is deterministic, so it holds the same prompts and verifier as the parent (a reasoning-gym
closure included), and answers `{"ready": <number of prompts>}` or `{"fatal": "<why>"}`. Each further line
`{"prompt_id", "response"}` gets `{"reward", "parsed", "error"}` (the fields of a `Verdict`); a prompt id the
task does not hold gets an error verdict.

The child ends by itself when its stdin closes (the parent closed it or died), when its parent process goes away
while it waits on something (a watchdog thread), and, as a backstop while it computes, when one request has used
`cpu_s` seconds of CPU (RLIMIT_CPU, raised before each request). `VerifierSandbox` is the parent side: it kills a
child whose answer takes longer than the timeout (SIGKILL to its process group), counts it, and starts a fresh one.

Test hook: PACEFLOW_VERIFIER_OVERRIDE=module:function, read only by the child, replaces the task's verifier with
that function (tests inject verifiers that hang, allocate or raise, in a real child).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the child imports the task machinery only after its limits are set
    from actors.tasks import Prompt, Task, Verdict
    from configs.schema import TaskConfig

OVERRIDE_ENV = "PACEFLOW_VERIFIER_OVERRIDE"
DEFAULT_MEMORY_MB = 2048
"""The child's own address space after importing math-verify, sympy and reasoning-gym and building a task is
~95 MB (GSM8K) to ~225 MB (reasoning-gym chain_sum); 2 GiB leaves a parse eight times that."""
STARTUP_CPU_S = 600
"""CPU seconds the child may spend building its task (a large reasoning-gym split takes seconds, not minutes)."""
_MIB = 1 << 20
# Numeric libraries size per-thread buffers by the core count; on a many-core node that alone could exceed
# the address-space limit, and the child never needs more than one thread of them.
_CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
_REPO = Path(__file__).resolve().parent.parent


class SandboxError(RuntimeError):
    """The verifier process could not start (a task it cannot build, a memory limit below its own baseline)."""


@dataclass
class SandboxCounters:
    starts: int = 0
    timeouts: int = 0
    """Children killed because an answer took longer than the timeout."""
    deaths: int = 0
    """Children that died by themselves while answering (memory, the CPU backstop, a crash in C code)."""
    memory_restarts: int = 0
    """Children replaced after a verifier hit the memory limit and survived (its heap may be left fragmented)."""


class VerifierSandbox:
    """Scores responses in a child process built from `task_cfg`; a verdict per response, None where the child
    was killed after `timeout_s` seconds on it. A child that died while answering yields an error verdict. The
    child is started at construction, so building its task overlaps the caller's own start-up."""

    def __init__(
        self,
        task_cfg: TaskConfig,
        *,
        timeout_s: float,
        memory_mb: int = DEFAULT_MEMORY_MB,
        cpu_s: float | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.task_json = task_cfg.model_dump_json()
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        # Twice the wall-clock timeout: the parent's kill always comes first; the CPU limit only ends a child
        # whose parent is gone while it computes.
        self.cpu_s = cpu_s if cpu_s is not None else 2 * timeout_s + 1
        self.startup_timeout_s = startup_timeout_s
        self.counters = SandboxCounters()
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buf = b""
        self._poll = select.poll()
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start a child if none is running; does not wait for it to be ready."""
        if self.proc is not None:
            return
        env = {**os.environ, **_CHILD_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "actors.verifier_sandbox", "--memory-mb", str(self.memory_mb)]
        argv += ["--cpu-s", str(self.cpu_s), "--parent", str(os.getpid())]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # failures come back as verdicts or a "fatal" line; stray output is noise
            env=env,
            start_new_session=True,  # its own process group: a kill reaches anything the verifier started
        )
        self.counters.starts += 1
        self._ready = False
        self._buf = b""
        assert self.proc.stdout is not None
        self._poll = select.poll()
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN)
        self._send(self.proc, self.task_json)

    def score(self, items: Sequence[tuple[Prompt, str]]) -> list[Verdict | None]:
        return [self._score_one(prompt, text) for prompt, text in items]

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> VerifierSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ internals
    def _score_one(self, prompt: Prompt, text: str) -> Verdict | None:
        from actors.tasks import Verdict

        proc = self._wait_ready()
        if not self._send(proc, json.dumps({"prompt_id": prompt.prompt_id, "response": text})):
            return self._died()
        line = self._readline(time.monotonic() + self.timeout_s)
        if line is None:
            self.counters.timeouts += 1
            self._kill()
            self.start()  # the next child builds its task while the caller goes on
            return None
        if line == b"":
            return self._died()
        try:
            reply = json.loads(line)
            verdict = Verdict(reward=reply["reward"], parsed=reply["parsed"], error=reply["error"])
        except (ValueError, KeyError, TypeError) as exc:  # a verifier wrote to the protocol's pipe
            self._kill()
            self.start()
            return Verdict(reward=None, error=f"verifier process answered garbage ({exc}): {line[:200]!r}")
        if verdict.error is not None and verdict.error.startswith("MemoryError"):
            self.counters.memory_restarts += 1
            self._kill()
            self.start()
        return verdict

    def _wait_ready(self) -> subprocess.Popen[bytes]:
        self.start()
        assert self.proc is not None
        if self._ready:
            return self.proc
        line = self._readline(time.monotonic() + self.startup_timeout_s)
        reply: dict[str, Any] = {}
        if line:
            try:
                reply = json.loads(line)
            except ValueError:
                reply = {"fatal": f"unexpected first line {line[:200]!r}"}
        if "ready" in reply:
            self._ready = True
            return self.proc
        why = reply.get("fatal") or (
            f"no answer in {self.startup_timeout_s:.0f} s" if line is None else f"exited with {self._exit_code()}"
        )
        self._kill()
        raise SandboxError(
            f"the verifier process did not start ({why}); with rollout.verifier_memory_mb={self.memory_mb} the task's "
            "imports need to fit, or set rollout.verifier_isolation='thread'"
        )

    def _died(self) -> Verdict:
        from actors.tasks import Verdict

        code = self._exit_code()
        self.counters.deaths += 1
        self._kill()
        self.start()
        return Verdict(reward=None, error=f"verifier process died ({code})")

    def _exit_code(self) -> str:
        if self.proc is None:
            return "not running"
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _send(self, proc: subprocess.Popen[bytes], line: str) -> bool:
        assert proc.stdin is not None
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # BrokenPipeError: the child is gone; the read that follows sees EOF
            return False
        return True

    def _readline(self, deadline: float) -> bytes | None:
        """The child's next line; b"" at EOF (it died), None when the deadline passed first."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(math.ceil(remaining * 1000)):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _kill(self) -> None:
        """SIGKILL the child's process group and reap it (no zombie left behind)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a write that the dead child never read is still buffered
                    pipe.close()
        self._ready = False
        self._buf = b""


# ------------------------------------------------------------------------------------------------ the child
def _set_limit(which: int, soft: int) -> None:
    _, hard = resource.getrlimit(which)
    soft = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _cpu_budget(seconds: float) -> None:
    """Allow `seconds` more CPU from now: RLIMIT_CPU counts the process's whole life, so it moves with each request."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_limit(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime + seconds))


def _watch_parent(parent: int) -> None:
    # Covers a verifier that blocks without using CPU (RLIMIT_CPU never fires) after the parent died: an orphan is
    # re-parented, so getppid changes.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


def _build(task_json: bytes) -> tuple[Task, dict[str, Prompt]]:
    import importlib

    from pydantic import TypeAdapter

    from actors.tasks import build_task, math_verifier
    from configs.schema import TaskConfig

    task = build_task(TypeAdapter(TaskConfig).validate_json(task_json))
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        module, _, name = override.partition(":")
        task.verifier = getattr(importlib.import_module(module), name)
    if task.verifier is math_verifier:  # paid here, once, rather than inside the first request's timeout
        with contextlib.suppress(ImportError):
            import math_verify  # noqa: F401
    return task, {p.prompt_id: p for p in [*task.train, *task.eval]}


def _answer(task: Task, prompts: dict[str, Prompt], line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
        prompt = prompts.get(request["prompt_id"])
        if prompt is None:
            return {"reward": None, "parsed": None, "error": f"unknown prompt_id {request['prompt_id']!r}"}
        verdict = task.score(prompt, str(request["response"]))
        reward = None if verdict.reward is None else float(verdict.reward)
        parsed = None if verdict.parsed is None else str(verdict.parsed)
        return {"reward": reward, "parsed": parsed, "error": verdict.error}
    except Exception as exc:  # a MemoryError outside the verifier too: an error verdict while the child lives
        return {"reward": None, "parsed": None, "error": f"{type(exc).__name__}: {exc}"}


def _write(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB)
    parser.add_argument("--cpu-s", type=float, default=60.0)
    parser.add_argument("--parent", type=int, default=os.getppid())
    args = parser.parse_args(argv)
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_AS, args.memory_mb * _MIB)
    _cpu_budget(STARTUP_CPU_S)
    # The protocol keeps private copies of stdin/stdout; a verifier that prints writes to stderr instead and one
    # that reads stdin sees nothing, so neither can corrupt or steal a request.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="parent-watch").start()
    try:
        task, prompts = _build(requests.readline())
    except BaseException as exc:  # a MemoryError at import when the limit is below the child's own baseline
        _write(replies, {"fatal": f"{type(exc).__name__}: {exc}"})
        return 1
    _write(replies, {"ready": len(prompts)})
    for line in requests:
        _cpu_budget(args.cpu_s)
        _write(replies, _answer(task, prompts, line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
