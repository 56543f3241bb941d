import pytest

from reasonrl.data.effort import effort_line, with_effort


def test_effort_line_and_question():
    assert effort_line(0.5) == "Effort: 0.5"
    assert effort_line(0.125) == "Effort: 0.125"
    assert with_effort("2 + 2", 0.25) == "2 + 2\nEffort: 0.25"
    assert with_effort("2 + 2", None) == "2 + 2"


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_effort_outside_the_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="effort must be in"):
        effort_line(bad)
