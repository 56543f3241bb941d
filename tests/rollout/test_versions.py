"""VersionGate: a push waits for the chunks in progress, holds new ones off, and sets the version they record."""

import threading
import time

import pytest

from reasonrl.rollout.versions import VersionGate


def test_a_push_waits_for_the_chunk_in_progress_and_the_next_chunk_waits_for_the_push():
    gate, events = VersionGate(), []
    in_chunk, release = threading.Event(), threading.Event()

    def generate():
        with gate.chunk() as version:
            events.append(("chunk", version))
            in_chunk.set()
            release.wait(10)
        with gate.chunk() as version:
            events.append(("chunk", version))

    def push():
        with gate.update(1):
            events.append(("push", gate.version))

    worker = threading.Thread(target=generate)
    worker.start()
    in_chunk.wait(10)
    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.2)
    assert events == [("chunk", 0)]  # the push waits for the chunk in progress
    release.set()
    worker.join(10)
    pusher.join(10)
    assert events == [("chunk", 0), ("push", 0), ("chunk", 1)]


def test_a_failed_push_keeps_the_version_and_a_failed_chunk_fails_the_next_push():
    gate = VersionGate(3)
    with pytest.raises(RuntimeError, match="push broke"), gate.update(4):
        raise RuntimeError("push broke")
    assert gate.version == 3
    with pytest.raises(ConnectionError), gate.chunk():
        raise ConnectionError("server died")
    with pytest.raises(ConnectionError, match="server died"), gate.update(4):
        pass
    assert gate.version == 3
