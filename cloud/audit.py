"""The audit log: an append-only, tamper-evident record of every gallery change and admin action.

One JSON object per line (ASCII: every client string is JSON-escaped, so no value can start a
line of its own), each with

    seq        1, 2, 3, ... with no gap
    time       UTC, ISO-8601 with microseconds ("2025-01-31T12:00:00.123456+00:00")
    principal  who asked (the client certificate's identity), and peer, where from
    call       the RPC or admin action; identity the gallery identity it concerned, or null
    outcome    "ok", "refused <STATUS>", "failed <STATUS>", "denied"...
    counts     numbers the call reported (pictures added, templates removed), or null
    detail     a short reason (why it was refused), or null
    prev       sha256 (hex) of the previous line's bytes without its newline; 64 zeros for the first

Durability: the file is opened O_APPEND|O_CREAT with mode 0600, each record is one write()
followed by fsync, so a record() that returned is on disk. Writers in several threads or
processes are serialised by a lock and an flock; each continues the chain from the file's
actual last line.

Tamper evidence: editing or deleting any line breaks the `prev` of the line after it (and a
deletion leaves a gap in `seq`); `verify_audit` names the first broken line. Two limits, by
construction of a plain hash chain: removing lines from the *end* leaves a valid, shorter
chain, and someone who can write the file can rewrite the whole chain after an edit. Both are
caught by comparing with a head kept elsewhere: `AuditLog.head` is (seq, sha256) of the last
record, and `verify_audit(path, head=...)` checks that the file still contains that record.

What it holds about people: the identity name and the counts, never a template, an embedding,
a picture or a metadata value (record() has no field for them, and `detail` is cut at 1024
characters; callers must not put them there). An erasure is recorded with the erased name:
GDPR art. 17 removes the biometric data, while the controller keeps the record that an erasure
was done, when and at whose request (art. 5(2) accountability, art. 30 records of processing).
The names in earlier records stay too; apply the retention period of your processing records
to this file as a whole (rotate it, verify, archive or delete).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import unicodedata
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from facelink.logsafe import printable

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the `prev` of the first record
FILE_MODE = 0o600
#: Longest string field kept; longer ones are cut and marked, so one call cannot bloat the log.
MAX_FIELD_LENGTH = 1024
_FIELDS = ("seq", "time", "principal", "peer", "call", "identity", "outcome", "counts", "detail", "prev")
_TAIL_CHUNK = 64 * 1024
_SPACE_RUNS = re.compile(" {2,}")


class AuditError(Exception):
    """The audit log cannot be written or continued."""


def line_hash(line: bytes) -> str:
    """The `prev` a record after `line` carries: sha256 of its bytes without the newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    """Appends audit records to `path` (created with mode 0600, parent folders 0700)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = self._open()
        self._size = -1  # file size after our last write; another size means another writer
        self._seq = 0
        self._head = GENESIS
        try:
            with self._locked_file() as size:
                self._continue_from_tail(size)
        except BaseException:
            self.close()
            raise

    def _open(self) -> int:
        created = not self.path.exists()
        old = os.umask(0o077)  # missing parent folders: 0700 (briefly process-wide; done at start-up)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags, FILE_MODE)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        finally:
            os.umask(old)
        try:
            if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            if created:
                _fsync_dir(self.path.parent)  # the new file's name is durable too, not only its data
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot make audit log {self.path} private (chmod 600): {exc}") from exc
        return fd

    @property
    def head(self) -> tuple[int, str]:
        """(seq, sha256) of the last record: keep it elsewhere to detect a truncated log later."""
        with self._lock:
            return self._seq, self._head

    def record(
        self,
        *,
        principal: str,
        peer: str,
        call: str,
        identity: str | None,
        outcome: str,
        counts: dict[str, int] | None = None,
        detail: str | None = None,
    ) -> None:
        """Append one record and fsync it; raises AuditError if it could not be made durable."""
        fields = {
            "principal": _text(principal, "principal"),
            "peer": _text(peer, "peer"),
            "call": _text(call, "call"),
            "identity": None if identity is None else _text(identity, "identity"),
            "outcome": _text(outcome, "outcome"),
            "counts": _counts(counts),
            "detail": None if detail is None else _text(detail, "detail"),
        }
        with self._lock, self._locked_file() as size:
            if size != self._size:  # another writer appended since our last record
                self._continue_from_tail(size)
            seq = self._seq + 1
            entry = {"seq": seq, "time": _now(), **fields, "prev": self._head}
            line = json.dumps(entry, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
            self._append(line, size)
            self._seq, self._head, self._size = seq, line_hash(line), size + len(line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the file ------------------------------------------------------------------------------

    def _file(self) -> int:
        if self._fd is None:
            raise AuditError(f"audit log {self.path} is closed")
        return self._fd

    def _locked_file(self) -> _FileLock:
        return _FileLock(self._file())

    def _append(self, line: bytes, size: int) -> None:
        """Write `line` at the end and fsync; on failure cut the file back to `size`, so a
        half-written record never stays to break the chain."""
        fd = self._file()
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                log.exception("audit log %s: could not remove a partly written record", self.path)
            raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc

    def _continue_from_tail(self, size: int) -> None:
        """Take seq and head from the file's last record; cut off a torn (newline-less) tail."""
        fd = self._file()
        tail = _read_tail(fd, size)
        complete = tail[: tail.rfind(b"\n") + 1]
        torn = tail[len(complete):]
        if torn:  # a write that crashed midway: never acknowledged, so never a record
            log.warning("audit log %s: removing an incomplete last line: %s", self.path,
                        printable(torn.decode("ascii", "backslashreplace")))
            os.ftruncate(fd, size - len(torn))
            os.fsync(fd)
            size -= len(torn)
        last = complete[:-1].rsplit(b"\n", 1)[-1] if complete else b""
        if not last:
            self._seq, self._head = 0, GENESIS
        else:
            try:
                self._seq = int(json.loads(last)["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(
                    f"cannot continue audit log {self.path}: its last line is not an audit record "
                    f"({exc}); run verify_audit on it"
                ) from exc
            self._head = line_hash(last)
        self._size = size


class _FileLock:
    """flock(LOCK_EX) on the audit file for one append; yields the file's size under the lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return os.fstat(self.fd).st_size

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _read_tail(fd: int, size: int) -> bytes:
    """The end of the file, far enough back to hold two newlines (or all of it): so it holds the
    whole last complete line, and whatever torn line follows it."""
    start = size
    data = b""
    while start > 0 and data.count(b"\n") < 2:
        step = min(_TAIL_CHUNK, start)
        start -= step
        data = os.pread(fd, step, start) + data
    return data


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"audit field {field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_FIELD_LENGTH:
        return value[:MAX_FIELD_LENGTH] + f"\u2026(+{len(value) - MAX_FIELD_LENGTH} characters)"
    return value


def _counts(counts: dict[str, int] | None) -> dict[str, int] | None:
    if counts is None:
        return None
    for key, value in counts.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"audit counts must map strings to integers, got {key!r}: {value!r}")
    return dict(counts)


# -- reading -----------------------------------------------------------------------------------


def read_audit(
    path: str | Path,
    *,
    since: datetime | None = None,
    identity: str | None = None,
    principal: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records of the audit log at `path`, oldest first, as stored.

    `since` keeps records at or after that instant (a naive datetime is taken as UTC);
    `identity` those about that identity, compared as names are (NFKC, spaces collapsed), so
    "Ada  Lovelace" finds records of "Ada Lovelace"; `principal` those of that caller, exactly;
    `limit` the last `limit` of the matches. Lines that are not records are skipped with a
    warning: reading is for people, `verify_audit` is what judges the file.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    after = None if since is None else since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    wanted = None if identity is None else _name_key(identity)
    matches: deque[dict[str, Any]] = deque(maxlen=limit)
    for number, record in _records(Path(path)):
        if record is None:
            log.warning("audit log %s: line %d is not an audit record; skipped (run verify_audit)", path, number)
            continue
        if after is not None and _time(record) < after:
            continue
        if wanted is not None and (not isinstance(record.get("identity"), str) or _name_key(record["identity"]) != wanted):
            continue
        if principal is not None and record.get("principal") != principal:
            continue
        matches.append(record)
    return list(matches)


def verify_audit(path: str | Path, *, head: str | None = None) -> tuple[bool, str]:
    """Check the hash chain and sequence of the audit log at `path`.

    Returns (True, a summary with the last seq and head hash) or (False, what is wrong and on
    which line). With `head` (a sha256 from `AuditLog.head`, kept elsewhere), the log must also
    still contain the record with that hash, which catches lines cut from the end.
    """
    file = Path(path)
    if not file.is_file():
        return False, f"no audit log at {file}"
    prev, count, seen_head = GENESIS, 0, head is None
    with file.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            problem = _check_line(line, number, prev)
            if problem:
                return False, f"{file}: line {number}: {problem}"
            prev, count = line_hash(line), number
            seen_head = seen_head or prev == head
    if not seen_head:
        return False, f"{file}: no record has the head hash {head}: the log was cut or rewritten after it"
    return True, f"{file}: {count} records, chain intact; last seq {count}, head sha256 {prev}"


def _check_line(line: bytes, number: int, prev: str) -> str | None:
    """What is wrong with line `number` given the hash of the line before, or None."""
    if not line.endswith(b"\n"):
        return "incomplete (no newline at the end): a torn write or an edit"
    try:
        record = json.loads(line)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(record, dict) or not set(_FIELDS) <= set(record):
        return f"not an audit record (it lacks one of {', '.join(_FIELDS)})"
    if isinstance(record["seq"], bool) or record["seq"] != number:
        return f"seq is {printable(record['seq'])}, expected {number}: a line before it was deleted or inserted"
    if record["prev"] != prev:
        what = "the first record must carry 64 zeros" if number == 1 else f"line {number - 1} was edited or deleted"
        return f"prev does not match the sha256 of the line before: {what}"
    try:
        _time(record)
    except ValueError as exc:
        return f"bad time ({exc})"
    return None


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record or None if the line is not one) for each line of the file."""
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                yield number, None
                continue
            yield number, record if _readable(record) else None


def _readable(record: object) -> bool:
    """Whether `record` has what read_audit filters on: a dict with a time carrying an offset."""
    if not isinstance(record, dict) or not isinstance(record.get("time"), str):
        return False
    try:
        _time(record)
    except ValueError:
        return False
    return True


def _time(record: dict[str, Any]) -> datetime:
    when = datetime.fromisoformat(record["time"])
    if when.tzinfo is None:
        raise ValueError(f"time {record['time']!r} has no UTC offset")
    return when


def _name_key(name: str) -> str:
    """A name as the gallery compares names (NFKC, runs of spaces as one), without refusing any."""
    return _SPACE_RUNS.sub(" ", unicodedata.normalize("NFKC", name)).strip(" ")
