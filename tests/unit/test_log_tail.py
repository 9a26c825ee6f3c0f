"""The agent's tail of an instance log: last lines, the offset they end at, partial lines left to the follower."""

import pytest

from services.agent.supervisor import read_tail

pytestmark = pytest.mark.unit


def test_last_lines_and_the_offset_they_end_at(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"one\ntwo\nthree\n")
    assert read_tail(log, 2, 1 << 20) == (["two", "three"], 14)
    assert read_tail(log, 10, 1 << 20) == (["one", "two", "three"], 14)
    assert read_tail(log, 0, 1 << 20) == ([], 14)


def test_a_line_still_being_written_is_left_for_the_follower(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"one\ntwo\nthr")
    lines, offset = read_tail(log, 5, 1 << 20)
    assert lines == ["one", "two"] and offset == 8  # the live line with offset 14 will carry "three"


def test_a_byte_budget_never_starts_mid_line_and_odd_bytes_are_kept(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"x" * 100 + b"\n" + b"caf\xe9\n" + b"end\n")
    lines, offset = read_tail(log, 10, 12)
    assert lines == ["caf\ufffd", "end"] and offset == 110
    assert read_tail(log, 10, 3) == ([], 110)  # the budget holds no whole line
