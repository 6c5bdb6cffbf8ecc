"""The gallery survives SIGKILL in the middle of enrollments, replacements and erasures.

A few rounds of the long run (`python -m facelink.benchmarks.crash_durability --rounds 100`): a
real `facelink cloud serve` process, concurrent enrolling clients, SIGKILL at a random moment (and
once right after a WAL write), a restart on the same gallery, and every acknowledged call checked.
Then the checks themselves: on made-up histories (no server), and on a gallery damaged on purpose
between the kill and the restart, which they must report: a checker that cannot fail proves nothing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from facelink.benchmarks import crash_durability as crash
from facelink.benchmarks.crash_durability import Call, CallResult, Held

from .support import needs_shared

ROUNDS = 3


# -- the checks on made-up histories -------------------------------------------------------------
def ok(call: Call, held_after: Held | None, before: Held | None = None) -> CallResult:
    """The reply the server gives to `call` when it was applied whole."""
    if call.kind == "remove":
        return CallResult(call, "ok", removed=len(before.pictures) if before else 0)
    return CallResult(call, "ok", added=len(call.pictures), total=len(held_after.pictures) if held_after else 0)


START = Held((1, 2), "a")
ADD = Call("b", "add", "x", (3,))
REPLACE = Call("c", "replace", "x", (4, 5))
AFTER_ADD = Held((1, 2, 3), "b")
AFTER_REPLACE = Held((4, 5), "c")


def history() -> list[CallResult]:
    """An acknowledged add, then a replace that was in flight at the kill."""
    return [ok(ADD, AFTER_ADD), CallResult(REPLACE, "uncertain", error="UNAVAILABLE")]


def test_the_acknowledged_state_or_the_whole_unacknowledged_call_is_durable() -> None:
    assert crash.judge_identity(START, history(), AFTER_ADD, []).pending == "not applied"
    verdict = crash.judge_identity(START, history(), AFTER_REPLACE, [])
    assert (verdict.outcome, verdict.pending, verdict.ack_mismatches) == ("ok", "applied", 0)


def test_a_state_before_an_acknowledged_call_is_a_loss() -> None:
    verdict = crash.judge_identity(START, history(), START, [])
    assert (verdict.outcome, verdict.lost_calls) == ("lost", 1)
    assert crash.judge_identity(START, [], None, []).outcome == "lost"  # an enrolled identity gone
    assert crash.judge_identity(START, [], Held((1,), "a"), []).outcome == "lost"  # one picture gone


def test_part_of_a_call_is_half_applied() -> None:
    a_picture_short = Held((4,), "c")
    only_its_metadata = Held((1, 2, 3), "c")
    assert crash.judge_identity(START, history(), a_picture_short, []).outcome == "half-applied"
    assert crash.judge_identity(START, history(), only_its_metadata, []).outcome == "half-applied"
    assert crash.judge_identity(START, [], START, ["templates per model disagree"]).outcome == "half-applied"


def test_a_reply_that_contradicts_the_history_is_counted() -> None:
    wrong = CallResult(ADD, "ok", added=1, total=2)  # the identity holds 3 pictures after it
    assert crash.judge_identity(START, [wrong], AFTER_ADD, []).ack_mismatches == 1


def test_audit_records_are_the_acknowledged_calls_then_maybe_the_unacknowledged_one() -> None:
    acked = [crash.audit_entry(ADD, START)]
    pending = crash.audit_entry(REPLACE, AFTER_ADD)
    for recorded, applied, expected in (
        (acked, "applied", (False, "")),                  # applied, killed before its record
        ([*acked, pending], "applied", (True, "")),
        ([*acked, pending], "not applied", (True, "records an unacknowledged call that was not applied")),
    ):
        verdict = crash.Verdict("ok", pending=applied)
        crash.judge_audit(verdict, START, history(), recorded)
        assert (verdict.pending_recorded, verdict.audit_problem) == expected
    verdict = crash.Verdict("ok")
    crash.judge_audit(verdict, START, history(), [])  # the acknowledged add has no record
    assert verdict.audit_problem


# -- the real server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool() -> crash.Pool:
    return crash.load_pool(4 * 3 + 1, crash.PICTURES_PER_IDENTITY, seed=0, data=None)


@needs_shared
def test_sigkill_during_enrollments_loses_nothing_acknowledged(pool: crash.Pool, tmp_path: Path) -> None:
    # share 1/3: rounds 1 and 2 are killed at a uniform moment, round 3 right after a WAL write.
    payload = crash.run_rounds(ROUNDS, pool=pool, workdir=tmp_path, after_commit_share=1 / ROUNDS, max_delay=1.0)
    summary = payload["summary"]
    problems = [p for r in payload["rounds"] for p in r["problems"]]
    assert summary["rounds"] == ROUNDS
    assert summary["acknowledged"]["total"] > 0 and summary["unacknowledged"] > 0  # calls were in flight
    assert summary["lost"] == 0, problems
    assert summary["half_applied"] == 0, problems
    assert crash.durable(summary), problems  # replies, audit, ListIdentities, file, recognition too
    assert set(payload["by_kill"]) == {"uniform", "after WAL write"}


@needs_shared
def test_the_checks_see_a_damaged_gallery(pool: crash.Pool, tmp_path: Path) -> None:
    def damage(round_index: int, gallery: Path) -> None:
        # The sentinel (the first name; enrolled before round 1, never touched) disappears from the
        # file, and the first audit record is edited: the next one no longer chains to it.
        connection = sqlite3.connect(gallery / "gallery.sqlite3")
        connection.execute("PRAGMA foreign_keys=ON")
        with connection:
            connection.execute("DELETE FROM identities WHERE name = ?", (sorted(pool.by_identity)[0],))
        connection.close()
        audit = gallery / "audit.jsonl"
        lines = audit.read_bytes().splitlines(keepends=True)
        lines[0] = lines[0].replace(b'"outcome":"', b'"outcome":"edited-')
        audit.write_bytes(b"".join(lines))

    payload = crash.run_rounds(1, pool=pool, workdir=tmp_path, after_commit_share=0, max_delay=0.5, tamper=damage)
    summary = payload["summary"]
    assert summary["lost"] >= 1
    assert summary["audit_mismatches"] >= 1
    assert summary["recognition_failures"] >= 1  # the sentinel is no longer recognised
    assert not crash.durable(summary)
