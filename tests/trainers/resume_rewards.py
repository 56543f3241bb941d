"""A reward for the kill-and-resume test (imported as `resume_rewards:digit_count_stalling` from a recipe)."""

import os
import time
from pathlib import Path

from rewards_for_tests import digit_count

_calls = {"n": 0}


def digit_count_stalling(completions, **kwargs):
    """digit_count, except that call number $REASONRL_STALL_AT_CALL (one call per step: one process, no dynamic
    sampling) creates the file $REASONRL_STALL_MARKER and then blocks, so the test can kill the trainer at a known
    point of a known step."""
    _calls["n"] += 1
    if str(_calls["n"]) == os.environ.get("REASONRL_STALL_AT_CALL"):
        Path(os.environ["REASONRL_STALL_MARKER"]).touch()
        time.sleep(3600)
    return digit_count(completions)
