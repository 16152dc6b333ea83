"""A verifier that misbehaves on request, loaded into a real verifier process with
PACEFLOW_VERIFIER_OVERRIDE=tests.actors.bad_verifiers:misbehave (actors/verifier_sandbox.py). The response text
says how it misbehaves; any other response is compared with the gold answer."""

from __future__ import annotations

import re
import sys
import time

from actors.tasks import Prompt, Verdict, exact_verifier

OVERRIDE = "tests.actors.bad_verifiers:misbehave"


def misbehave(prompt: Prompt, response: str) -> Verdict:
    if response == "raise":
        raise ValueError("parser crashed")
    if response == "allocate":
        blob = bytearray(8 << 30)  # 8 GiB, far past any verifier_memory_mb used in the tests
        return Verdict(reward=float(len(blob)))
    if response == "sleep":
        time.sleep(600)  # blocked without using CPU: only a kill or the parent watchdog ends it
    if response == "spin":
        # Catastrophic backtracking inside the C regex engine: CPU-bound, and the GIL is never released.
        re.fullmatch(r"(a+)+$", "a" * 64 + "!")
    if response == "print":
        sys.stdout.write('{"reward": 1.0, "parsed": "forged", "error": null}\n')  # must not reach the protocol's pipe
        sys.stdout.flush()
    return exact_verifier(prompt, response)
