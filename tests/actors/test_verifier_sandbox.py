"""Verifiers in a child process: hung, memory-hungry, raising and CPU-bound verifiers cost one invalid reward and a
fresh process, never the actor; rewards equal the in-process ones; no child outlives its parent."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.scoring import RewardScorer
from actors.tasks import Prompt, Task, build_task
from actors.verifier_sandbox import OVERRIDE_ENV, SandboxError, VerifierSandbox
from configs.schema import CreativeTaskConfig, GSM8KTaskConfig, RolloutConfig
from tests.actors.bad_verifiers import OVERRIDE

REPO = Path(__file__).resolve().parents[2]
GSM8K = GSM8KTaskConfig(train_size=50, eval_size=10)


@pytest.fixture(scope="module")
def gsm8k() -> Task:
    return build_task(GSM8K)


@pytest.fixture
def misbehaving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children started from here on use tests/actors/bad_verifiers.py's verifier instead of the task's."""
    monkeypatch.setenv(OVERRIDE_ENV, OVERRIDE)


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it (it runs nothing any more)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


def _peak_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmPeak:"))
    return int(line.split()[1]) / 1024


def test_rewards_match_thread_mode_on_gsm8k_prompts(gsm8k: Task) -> None:
    on_threads = RewardScorer(gsm8k, timeout_s=10.0)
    in_process = RewardScorer.for_task(gsm8k, GSM8K, RolloutConfig())  # the config's default: a child process
    assert in_process.sandbox is not None and on_threads.sandbox is None
    try:
        for p in gsm8k.train[:6]:
            assert p.answer is not None
            texts = [
                f"So the total is \\boxed{{{p.answer}}}.",
                f"Step by step... The answer is {p.answer}",
                f"\\boxed{{{p.answer}.0}}",
                f"\\boxed{{{int(p.answer) + 1}}}",
                "I do not know.",
            ]
            expected = on_threads.score(p, texts)
            got = in_process.score(p, texts)
            assert got == expected
            assert got.rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
        assert in_process.counters == on_threads.counters
        assert in_process.sandbox.counters.starts == 1  # one child for every call
    finally:
        on_threads.close()
        in_process.close()


def test_thread_isolation_and_tasks_without_a_verifier_start_no_process(gsm8k: Task) -> None:
    creative_cfg = CreativeTaskConfig(num_prompts=10, eval_size=2)
    creative = RewardScorer.for_task(build_task(creative_cfg), creative_cfg, RolloutConfig())
    assert creative.sandbox is None
    assert all(math.isnan(r) for r in creative.score(Prompt("p", "q"), ["a"]).rewards)
    threads = RewardScorer.for_task(gsm8k, GSM8K, RolloutConfig(verifier_isolation="thread"))
    assert threads.sandbox is None and threads.pool is not None
    creative.close()
    threads.close()


def test_a_hung_verifier_is_killed_and_a_fresh_process_answers_the_next_call(gsm8k: Task) -> None:
    p = gsm8k.train[0]
    scorer = RewardScorer(gsm8k, timeout_s=1.0, sandbox=VerifierSandbox(GSM8K, timeout_s=1.0))
    assert scorer.sandbox is not None
    assert scorer.score(p, [f"\\boxed{{{p.answer}}}"]).rewards == [1.0]  # started and warm
    first = scorer.sandbox.pid
    assert first is not None
    start = time.monotonic()
    # Real model output: math-verify's sympy parse of this tower takes ~5 s on the main thread (where its own
    # SIGALRM timeout stops it) and never ends on any other thread.
    scores = scorer.score(p, ["\\boxed{9^{9^{9^{9}}}}"])
    elapsed = time.monotonic() - start
    assert math.isnan(scores.rewards[0]) and scores.parsed == [None]
    assert 1.0 <= elapsed < 3.0
    assert scorer.counters.timeouts == 1 and scorer.sandbox.counters.timeouts == 1
    assert _gone(first)  # killed and reaped: no zombie, no orphan
    assert scorer.sandbox.pid not in (None, first)
    assert scorer.score(p, [f"\\boxed{{{p.answer}}}", "\\boxed{-1}"]).rewards == [1.0, 0.0]
    assert scorer.sandbox.counters.starts == 2
    second = scorer.sandbox.pid
    assert second is not None
    scorer.close()
    assert _gone(second)


def test_a_verifier_past_the_memory_limit_gets_an_error_verdict(gsm8k: Task, misbehaving: None) -> None:
    p = gsm8k.train[0]
    sandbox = VerifierSandbox(GSM8K, timeout_s=10.0, memory_mb=512)
    scorer = RewardScorer(gsm8k, timeout_s=10.0, sandbox=sandbox)
    try:
        scores = scorer.score(p, ["allocate", f"<answer>{p.answer}</answer>"])
        assert math.isnan(scores.rewards[0]) and scores.rewards[1] == 1.0
        assert scorer.counters.errors == 1 and scorer.counters.last_error.startswith("MemoryError")
        # The child survived its MemoryError but is replaced anyway: its heap may be left in pieces.
        assert sandbox.counters.memory_restarts == 1 and sandbox.counters.starts == 2
    finally:
        scorer.close()


def test_adversarial_math_stays_inside_the_memory_limit(gsm8k: Task) -> None:
    """Real model output that makes sympy grow by hundreds of MB (past 1.6 GB in 30 s on a thread) stays under the
    child's limit; math-verify absorbs the MemoryError, so the answer is simply wrong and the child lives on."""
    p = gsm8k.train[0]
    with VerifierSandbox(GSM8K, timeout_s=15.0, memory_mb=300) as sandbox:
        (verdict,) = sandbox.score([(p, "\\boxed{2^{2^{2^{2^{2^{2}}}}}}")])
        assert verdict is not None and verdict.reward == 0.0
        pid = sandbox.pid
        assert pid is not None and _peak_mib(pid) <= 300
        (verdict,) = sandbox.score([(p, f"\\boxed{{{p.answer}}}")])
        assert verdict is not None and verdict.reward == 1.0
        assert sandbox.pid == pid and sandbox.counters.starts == 1


def test_raising_printing_and_unknown_prompts_give_error_verdicts(gsm8k: Task, misbehaving: None) -> None:
    p = gsm8k.train[0]
    with VerifierSandbox(GSM8K, timeout_s=10.0) as sandbox:
        raised, printed, unknown, right = sandbox.score(
            [(p, "raise"), (p, "print"), (Prompt("not-a-prompt", "q", "1"), "1"), (p, f"<answer>{p.answer}</answer>")]
        )
        assert raised is not None and raised.reward is None and raised.error == "ValueError: parser crashed"
        assert printed is not None and printed.reward == 0.0 and printed.parsed is None  # not the forged reply
        assert unknown is not None and unknown.reward is None and "unknown prompt_id" in (unknown.error or "")
        assert right is not None and right.reward == 1.0
        assert sandbox.counters.starts == 1  # none of these needed a new child


def test_the_cpu_limit_ends_a_verifier_stuck_in_c_code(gsm8k: Task, misbehaving: None) -> None:
    """The backstop for a parent that cannot kill: RLIMIT_CPU ends a child that holds the GIL in C code."""
    p = gsm8k.train[0]
    with VerifierSandbox(GSM8K, timeout_s=60.0, cpu_s=1.0) as sandbox:
        start = time.monotonic()
        (verdict,) = sandbox.score([(p, "spin")])
        assert time.monotonic() - start < 20.0
        assert verdict is not None and verdict.reward is None
        assert verdict.error == "verifier process died (signal SIGXCPU)"
        assert sandbox.counters.deaths == 1
        (verdict,) = sandbox.score([(p, f"\\boxed{{{p.answer}}}")])
        assert verdict is not None and verdict.reward == 1.0


PARENT = """
from actors.tasks import build_task
from actors.verifier_sandbox import VerifierSandbox
from configs.schema import GSM8KTaskConfig

cfg = GSM8KTaskConfig(train_size=5, eval_size=1)
p = build_task(cfg).train[0]
idle, busy = VerifierSandbox(cfg, timeout_s=600), VerifierSandbox(cfg, timeout_s=600)
idle.score([(p, "1")])
busy.score([(p, "1")])
print(idle.pid, busy.pid, flush=True)
busy.score([(p, "sleep")])
"""


def test_children_end_when_their_parent_is_killed(misbehaving: None) -> None:
    """SIGKILL leaves the parent no chance to clean up: the idle child sees stdin close, the one blocked in a
    verifier (no CPU used, so no CPU limit) is ended by its watchdog."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert parent.stdout is not None
        idle, busy = (int(x) for x in parent.stdout.readline().split())
        time.sleep(0.5)  # the "sleep" request is in flight
        assert not _gone(idle) and not _gone(busy)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_gone(idle, 5.0)
    assert _wait_gone(busy, 5.0)


def test_a_memory_limit_below_the_childs_own_needs_is_an_error_that_says_so() -> None:
    with VerifierSandbox(GSM8K, timeout_s=5.0, memory_mb=40) as sandbox:
        with pytest.raises(SandboxError, match=r"did not start.*verifier_memory_mb=40"):
            sandbox.score([(Prompt("p", "q", "1"), "1")])
        assert sandbox.pid is None  # the failed child is reaped, not left behind
