"""Policy versions of generated tokens, and the gate that keeps a weight push from landing inside a generation chunk.

Generation runs in chunks (a whole batch, or `rollout.inflight_chunk_tokens` tokens of every sequence); each chunk
holds the gate open for reading and records the version it ran under, and a push (`update`) waits for the chunks in
progress, keeps new ones from starting, and sets the next version. So every token's version is exact: the weights
cannot change while a chunk runs, whichever thread pushes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class VersionGate:
    """A readers-writer lock with a version number; a waiting writer (push) goes before new readers (chunks)."""

    def __init__(self, version: int = 0):
        self.version = version
        self._cond = threading.Condition()
        self._chunks = 0
        self._updating = False
        self.failed: BaseException | None = None  # the error that ended a chunk, if one did

    @contextmanager
    def chunk(self):
        """Holds off pushes while a chunk generates; yields the version of the weights it generates with."""
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            self._chunks += 1
            version = self.version
        try:
            yield version
        except BaseException as err:
            self.failed = err
            raise
        finally:
            with self._cond:
                self._chunks -= 1
                self._cond.notify_all()

    @contextmanager
    def update(self, version: int):
        """Waits for the chunks in progress, holds new ones off during the push, then sets `version` (unchanged when
        the push raises: the engine's weights are then unknown and the run stops). A chunk that failed meanwhile
        (a dead or hung server) raises its error here: a push would only wait for the same server once more."""
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            self._updating = True
            self._cond.wait_for(lambda: self._chunks == 0)
            if self.failed is not None:
                self._updating = False
                self._cond.notify_all()
                raise self.failed
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._cond:
                if ok:
                    self.version = version
                self._updating = False
                self._cond.notify_all()

