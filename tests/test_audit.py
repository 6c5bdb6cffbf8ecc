"""The audit log (append-only, durable, hash-chained) and `printable` for client strings in logs."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from facelink.cloud import audit as audit_module
from facelink.cloud.audit import GENESIS, AuditError, AuditLog, line_hash, read_audit, verify_audit
from facelink.logsafe import printable


def entry(log: AuditLog, n: int = 0, **overrides: object) -> None:
    fields: dict[str, object] = {
        "principal": f"admin-{n % 2}", "peer": f"ipv4:10.0.0.{n}:5000", "call": "Enroll",
        "identity": f"person {n}", "outcome": "ok", "counts": {"added": n}, "detail": None,
    }
    fields.update(overrides)
    log.record(**fields)  # type: ignore[arg-type]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def test_records_are_chained_json_lines(path):
    with AuditLog(path) as log:
        entry(log, 1)
        entry(log, 2, call="RemoveIdentity", identity="Ada Lovelace", counts={"templates": 3})
        entry(log, 3, outcome="refused INVALID_ARGUMENT", identity=None, counts=None, detail="bad name")
        head = log.head
    raw = lines(path)
    records = [json.loads(line) for line in raw]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == line_hash(raw[0]) and records[2]["prev"] == line_hash(raw[1])
    assert head == (3, line_hash(raw[2]))
    assert records[1] | {"time": "", "prev": ""} == {
        "seq": 2, "time": "", "principal": "admin-0", "peer": "ipv4:10.0.0.2:5000", "call": "RemoveIdentity",
        "identity": "Ada Lovelace", "outcome": "ok", "counts": {"templates": 3}, "detail": None, "prev": "",
    }
    assert records[2]["identity"] is None and records[2]["detail"] == "bad name"
    for r in records:  # UTC, ISO-8601, microseconds
        when = datetime.fromisoformat(r["time"])
        assert when.utcoffset() == timedelta(0) and len(r["time"].split(".")[1]) == len("123456+00:00")
        assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=1)
    assert all(line.isascii() for line in raw)
    assert verify_audit(path)[0]


def test_the_file_is_private_whatever_the_umask(path):
    old = os.umask(0)
    try:
        with AuditLog(path) as log:
            entry(log)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # the folder it created


def test_an_existing_file_is_made_private(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    with AuditLog(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_every_record_is_fsynced(path, monkeypatch):
    with AuditLog(path) as log:
        synced = []
        real = os.fsync
        monkeypatch.setattr(audit_module.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
        for n in range(3):
            entry(log, n)
        assert len(synced) == 3


def test_a_reopened_log_continues_the_chain(path):
    with AuditLog(path) as log:
        entry(log, 1)
    with AuditLog(path) as log:
        assert log.head == (1, line_hash(lines(path)[0]))
        entry(log, 2)
    ok, message = verify_audit(path)
    assert ok and "2 records" in message and json.loads(lines(path)[1])["seq"] == 2


def test_client_strings_cannot_break_a_line(path):
    with AuditLog(path) as log:
        entry(log, identity='Mallory\n{"seq": 99, "outcome": "ok"}\r\x1b[2K\u2028', detail="x\u202ey")
        entry(log, principal="p" * 5000)
    raw = lines(path)
    assert len(raw) == 2 and verify_audit(path)[0]
    record = json.loads(raw[0])
    assert record["identity"] == 'Mallory\n{"seq": 99, "outcome": "ok"}\r\x1b[2K\u2028'  # kept, escaped in JSON
    long = json.loads(raw[1])["principal"]
    assert len(long) < 1100 and long.startswith("p" * 1024) and "+3976 characters" in long


def test_bad_field_types_are_refused(path):
    with AuditLog(path) as log:
        with pytest.raises(TypeError):
            entry(log, counts={"n": 1.5})
        with pytest.raises(TypeError):
            entry(log, counts={"n": True})
        with pytest.raises(TypeError):
            entry(log, identity=5)
    assert path.read_bytes() == b""


def test_concurrent_writers_keep_one_chain(path):
    first, second = AuditLog(path), AuditLog(path)  # two writers, as two processes would be

    def work(log: AuditLog, base: int) -> None:
        for n in range(40):
            entry(log, base + n)

    threads = [threading.Thread(target=work, args=(log, 100 * i)) for i, log in enumerate([first, second, first, second])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    second.close()
    ok, message = verify_audit(path)
    assert ok, message
    assert len(lines(path)) == 160


def test_a_failed_write_leaves_no_partial_line(path, monkeypatch):
    with AuditLog(path) as log:
        entry(log, 1)
        real = os.write

        def half_then_full(fd: int, data: bytes) -> int:
            if len(data) > 20:
                return real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(audit_module.os, "write", half_then_full)
        with pytest.raises(AuditError, match="No space left"):
            entry(log, 2)
        monkeypatch.setattr(audit_module.os, "write", real)
        entry(log, 3)
    ok, message = verify_audit(path)
    assert ok, message
    assert [json.loads(line)["counts"]["added"] for line in lines(path)] == [1, 3]


def test_a_torn_last_line_is_cut_on_open(path, caplog):
    with AuditLog(path) as log:
        entry(log, 1)
    with path.open("ab") as f:
        f.write(b'{"seq": 2, "time": "2025-')  # a crash in the middle of a write
    assert verify_audit(path) == (False, f"{path}: line 2: incomplete (no newline at the end): a torn write or an edit")
    with caplog.at_level(logging.WARNING), AuditLog(path) as log:
        entry(log, 2)
    assert "incomplete last line" in caplog.text
    assert verify_audit(path)[0] and len(lines(path)) == 2


def test_a_log_whose_last_line_is_not_a_record_is_not_continued(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not json\n")
    with pytest.raises(AuditError, match="last line is not an audit record"):
        AuditLog(path)


# -- tamper evidence -------------------------------------------------------------------------------


@pytest.fixture
def five(path: Path) -> Path:
    with AuditLog(path) as log:
        for n in range(1, 6):
            entry(log, n)
    return path


def rewrite(path: Path, edit: Callable[[list[bytes]], object]) -> None:
    raw = lines(path)
    edit(raw)
    path.write_bytes(b"".join(raw))


def test_verify_accepts_an_intact_log(five):
    ok, message = verify_audit(five)
    assert ok and "5 records" in message and line_hash(lines(five)[-1]) in message


def test_verify_finds_an_edited_line(five):
    rewrite(five, lambda raw: raw.__setitem__(2, raw[2].replace(b'"outcome":"ok"', b'"outcome":"no"')))
    ok, message = verify_audit(five)
    assert not ok and "line 4" in message and "line 3 was edited or deleted" in message


def test_verify_finds_a_deleted_line(five):
    rewrite(five, lambda raw: raw.pop(2))
    ok, message = verify_audit(five)
    assert not ok and "line 3" in message and "seq is 4, expected 3" in message


def test_verify_finds_a_deleted_first_line(five):
    rewrite(five, lambda raw: raw.pop(0))
    assert not verify_audit(five)[0]


def test_verify_finds_a_deleted_line_with_renumbered_seq(five):
    def edit(raw: list[bytes]) -> None:
        raw.pop(1)
        for i in range(1, len(raw)):
            record = json.loads(raw[i])
            record["seq"] = i + 1
            raw[i] = json.dumps(record, separators=(",", ":")).encode() + b"\n"

    rewrite(five, edit)
    ok, message = verify_audit(five)
    assert not ok and "line 2" in message and "prev does not match" in message


def test_verify_finds_swapped_lines(five):
    rewrite(five, lambda raw: raw.__setitem__(slice(1, 3), [raw[2], raw[1]]))
    assert not verify_audit(five)[0]


def test_a_cut_tail_is_found_against_a_head_kept_elsewhere(five):
    head = line_hash(lines(five)[-1])
    assert verify_audit(five, head=head)[0]
    rewrite(five, lambda raw: raw.pop())
    assert verify_audit(five)[0]  # a shorter chain is still a chain...
    ok, message = verify_audit(five, head=head)
    assert not ok and "cut or rewritten" in message  # ...which the kept head exposes


def test_verify_of_a_missing_or_empty_log(tmp_path):
    assert verify_audit(tmp_path / "none.jsonl") == (False, f"no audit log at {tmp_path / 'none.jsonl'}")
    (tmp_path / "empty.jsonl").touch()
    assert verify_audit(tmp_path / "empty.jsonl")[0]


# -- reading -------------------------------------------------------------------------------------


def test_read_filters_and_limits(path):
    with AuditLog(path) as log:
        entry(log, 1, identity="Ada Lovelace")
        entry(log, 2, identity="Grace Hopper", principal="ops")
        entry(log, 3, identity="Ada  Lovelace", call="RemoveIdentity")
        entry(log, 4, identity=None, call="Reload")
    everything = read_audit(path)
    assert [r["seq"] for r in everything] == [1, 2, 3, 4]
    assert [r["seq"] for r in read_audit(path, identity="Ada\u00a0Lovelace")] == [1, 3]  # as names compare
    assert [r["seq"] for r in read_audit(path, principal="ops")] == [2]
    assert [r["seq"] for r in read_audit(path, limit=2)] == [3, 4]  # the most recent
    assert read_audit(path, limit=0) == []
    third = datetime.fromisoformat(everything[2]["time"])
    assert [r["seq"] for r in read_audit(path, since=third)] == [3, 4]
    naive_utc = third.astimezone(timezone.utc).replace(tzinfo=None)
    assert [r["seq"] for r in read_audit(path, since=naive_utc)] == [3, 4]
    assert read_audit(path, since=third + timedelta(days=1)) == []
    assert [r["seq"] for r in read_audit(path, identity="Ada Lovelace", principal="admin-1", limit=5)] == [1, 3]


def test_read_skips_a_line_that_is_not_a_record(path, caplog):
    with AuditLog(path) as log:
        entry(log, 1)
    with path.open("ab") as f:
        f.write(b'garbage\n{"seq": 3, "time": "yesterday"}\n')
    with caplog.at_level(logging.WARNING):
        assert [r["seq"] for r in read_audit(path, since=datetime(2000, 1, 1))] == [1]
    assert "line 2 is not an audit record" in caplog.text and "line 3 is not" in caplog.text


# -- printable -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Ada Lovelace", "Ada Lovelace"),
        ("José Ñúñez 李雷 🔬", "José Ñúñez 李雷 🔬"),
        ("two\nlines", "two\\x0alines"),
        ("cr\rlf\r\n", "cr\\x0dlf\\x0d\\x0a"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
        ("a\u200bb\u200dc", "a\\u200bb\\u200dc"),
        ("\u202eevil", "\\u202eevil"),
        ("no\u00a0break", "no\\xa0break"),
        ("line\u2028sep", "line\\u2028sep"),
        ("filler\u3164", "filler\\u3164"),
        ("private\ue000\U000f0000", "private\\ue000\\U000f0000"),
        ("lone\ud800", "lone\\ud800"),
        ("back\\x0aslash", "back\\\\x0aslash"),  # a literal backslash cannot pose as an escape
        ("tab\there", "tab\\x09here"),
    ],
)
def test_printable_escapes_what_cannot_be_seen(text, shown):
    assert printable(text) == shown


def test_printable_truncates_with_an_ellipsis_never_inside_an_escape():
    assert printable("a" * 200) == "a" * 200
    cut = printable("a" * 300)
    assert len(cut) == 200 and cut == "a" * 199 + "\u2026"
    assert printable("\n" * 100, limit=10) == "\\x0a\\x0a\u2026"
    assert printable("ab", limit=1) == "\u2026"
    assert printable(12345) == "12345"
    with pytest.raises(ValueError):
        printable("x", limit=0)


def test_a_client_string_cannot_forge_a_log_line(caplog):
    logger = logging.getLogger("facelink.test.forgery")
    with caplog.at_level(logging.INFO, logger="facelink.test.forgery"):
        logger.info("enroll %s", printable("Mallory\nINFO facelink.cloud: enroll ok for admin"))
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "\\x0a" in record.getMessage()
