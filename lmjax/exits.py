"""How a process of a multi-process run ends when another has died or a save failed: one line,
then at once (imports no JAX: it reads whether JAX is loaded)."""

from __future__ import annotations

import os
import sys
import threading

# what a collective raises when another process of the run has died (gloo's CPU collectives, JAX's
# coordination service); on GPU/TPU the coordination service usually ends the process from C++ instead
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "heartbeat timeout")
PEER_LOST_EXIT_CODE = 5
_EXITING = threading.Lock()  # the watchdog's thread and the main thread can see the same failure at once


def exit_if_peer_lost(error: Exception) -> None:
    """If `error` says that another process of this multi-process run is gone: one line, and exit with
    PEER_LOST_EXIT_CODE at once (a normal exit would wait in jax.distributed's shutdown for the dead
    process until the heartbeat timeout, then abort with a page of C++ stack)."""
    jax = sys.modules.get("jax")
    if jax is None or jax.process_count() == 1 or not any(m in str(error) for m in PEER_LOST_MESSAGES):
        return
    _EXITING.acquire()  # a second thread waits here for the first one's exit
    print(f"lmjax: error: another process of this run stopped ({str(error).splitlines()[0][:160]}); run the same "
          "command again: it resumes from the newest checkpoint.", file=sys.stderr)
    exit_at_once_if_distributed(PEER_LOST_EXIT_CODE)


def exit_at_once_if_distributed(code: int) -> None:
    """In a multi-process run, end this process now with `code` (output flushed), skipping the
    interpreter's shutdown: it would wait for Orbax's threads, which wait in a barrier for a process
    whose save failed, and in jax.distributed's shutdown barrier for a dead process."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
