"""Keeping the terminal for the user: third-party output (library warnings, progress bars, engine logs, C++ logs
of Ray and vLLM, and whatever their subprocesses print) goes to a log file, and paceflow's own display goes to
the terminal.

`third_party_output_to(path)` points file descriptors 1 and 2 at the log file, which child processes inherit,
and yields a text stream on the original stdout for paceflow's display (a rich Console writes there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def third_party_output_to(log_path: Path) -> Iterator[TextIO]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    previous_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    logging.captureWarnings(True)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # shown once each, in the log
            yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        terminal.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()
        logging.captureWarnings(False)
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Progress bars that would otherwise fill the log with carriage-return frames.
_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
