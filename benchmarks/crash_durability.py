"""Crash durability of the gallery: SIGKILL `facelink cloud serve` while enrollments are in flight.

    python -m facelink.benchmarks.crash_durability --rounds 100
    python -m facelink.benchmarks.crash_durability --rounds 3 --json /tmp/crash.json   # a smoke test

The server is the real one (`python -m facelink.cli cloud serve`, its own process) on one gallery
folder that lives through every round. Before round 1 a sentinel identity is enrolled that no
client ever touches. Then each round:

1. `--clients` threads call the Gallery service back to back, each with its own token and its own
   identities (LFW people enrolled with their own pictures): add 1-3 pictures, replace them all
   with 1-3 others, or remove the identity. Every call carries metadata {"op": <call id>}, which
   an add merges and a replace overwrites, so the stored metadata names the last call applied to
   the identity, in the same transaction as its templates.
2. After a random delay (uniform, up to `--max-delay` s) the server gets SIGKILL, calls in flight.
   In a share of the rounds (`--after-commit-share`, spread evenly) the kill waits, after the
   delay, for the next write to the gallery's WAL file and lands within a millisecond or so of a
   commit: the window between a commit, its audit record and its reply, which a uniform moment
   rarely hits. A client stops at its first failed call: that call is *unacknowledged* (it may or
   may not have been applied); every call that returned OK is *acknowledged*.
3. The server is started again on the same gallery; the restart time is until its health check
   says SERVING.
4. Checked, against the calls each client saw acknowledged:
   * per identity, the stored state (which pictures its templates are, and the metadata's call id)
     is the state after its last acknowledged call, or that plus its unacknowledged call, whole.
     An earlier state means acknowledged calls were *lost*; any other state (part of a call's
     pictures, metadata of one call with templates of another, models or picture keys that
     disagree, a template that is no enrolled picture) is *half-applied*. Pictures are recognised
     by their template of the primary recogniser, against reference embeddings made in this
     process by the same engine code.
   * each acknowledged Enroll's templates_added/templates_total (and RemoveIdentity's
     templates_removed) agree with that history;
   * the SQLite file passes `PRAGMA integrity_check` and `foreign_key_check`; ListIdentities
     (every page) agrees with the stored templates (names, counts, metadata, total);
   * the audit log verifies (`verify_audit`, after the restart has cut a torn tail, if any) and
     its "ok" records of the round are, per identity, exactly the acknowledged calls in order,
     optionally followed by the unacknowledged one. Whether an unacknowledged call that was
     applied also got its record is counted, not judged: the server commits, then writes the
     record, then answers, so a kill between the two leaves an applied change without a record;
   * the restarted server recognises the sentinel and one other enrolled identity from one of
     their enrolled pictures (Recognize stream, picture payload).
   The next round starts from the state found, so the gallery accumulates across rounds.

Killing the process (not the machine) is what this tests: SQLite's WAL with synchronous=NORMAL
keeps every commit once write() returned, but a power cut is out of scope here. The command exits
with status 1 if any check failed (lost, half-applied, reply, audit, file or recognition).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np

from facelink.cloud.gallery.store import decode_vector

from . import reporting

CallKind = Literal["add", "replace", "remove"]
#: An audit record as compared here: (call, counts).
AuditEntry = tuple[str, dict[str, int] | None]
#: Status codes after which the server may or may not have applied the call (it died, or failed
#: inside); any other error is the server's answer that it refused the call.
UNCERTAIN_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
})
#: Cosine above which a stored template is taken to be a reference picture's embedding. The same
#: picture through the same model gives ~1.0; different LFW pictures of one person stay far below.
SAME_PICTURE = 0.995
#: Pictures taken of each LFW person (people with fewer are not chosen).
PICTURES_PER_IDENTITY = 8
CALL_TIMEOUT_S = 30.0
SCOPES_CLIENT = ("enroll", "remove", "read")
SCOPES_CHECKER = ("read", "recognize")


# -- the pictures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    """Enrollment pictures: JPEG bytes, which identity (LFW person) each belongs to, and each
    one's unit embedding by the server's primary recogniser (the reference to recognise a stored
    template by)."""

    jpegs: list[bytes]
    owner: list[str]                    # picture id -> identity
    by_identity: dict[str, list[int]]   # identity -> its picture ids
    references: np.ndarray              # (pictures, d) float32, unit rows
    primary_model: str


def load_pool(identities: int, per_identity: int, seed: int, data: str | None) -> Pool:
    """`identities` LFW people with at least `per_identity` pictures, chosen by `seed`."""
    from facelink.datasets import LFW

    people = [(name, paths) for name, paths in LFW.locate(data, download=False).people().items()
              if len(paths) >= per_identity]
    if len(people) < identities:
        raise ValueError(f"LFW has {len(people)} people with {per_identity}+ pictures; {identities} wanted")
    chosen = sorted(random.Random(seed).sample(people, identities))
    jpegs, owner = [], []
    for name, paths in chosen:
        for path in paths[:per_identity]:
            jpegs.append(path.read_bytes())
            owner.append(name)
    model, references = reference_embeddings(jpegs)
    return _distinct_pictures(jpegs, owner, references, model)


def reference_embeddings(jpegs: Sequence[bytes]) -> tuple[str, np.ndarray]:
    """(primary model id, unit embeddings) of the pictures, computed as the server's enrollment
    computes them: a RecognitionEngine with CloudConfig's defaults (the ones `cloud serve` starts
    with), its largest detected face, its primary recogniser."""
    from facelink.cloud.engine import RecognitionEngine
    from facelink.cloud.gallery import Gallery
    from facelink.config import CloudConfig
    from facelink.runtime.codecs import decode_image

    with tempfile.TemporaryDirectory(prefix="facelink-crash-ref-") as tmp:
        gallery = Gallery.open(tmp)  # empty and thrown away: the engine needs one
        try:
            engine = RecognitionEngine(CloudConfig(gallery_dir=Path(tmp)), gallery)
            vectors = []
            for index, jpeg in enumerate(jpegs):
                image = decode_image(jpeg, what=f"picture {index}")
                landmarks, _ = engine.locate_face(image, None, f"picture {index}")
                vectors.append(engine.recognizer.embed(image, landmarks))
        finally:
            gallery.close()
    stacked = np.asarray(vectors, np.float64)
    unit = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
    return engine.recognizer.model_id, unit.astype(np.float32)


def _distinct_pictures(jpegs: list[bytes], owner: list[str], references: np.ndarray, model: str) -> Pool:
    """Drop near-duplicate pictures (LFW has a few), so a template names one picture only."""
    keep: list[int] = []
    for index in range(len(jpegs)):
        if not keep or float(np.max(references[keep] @ references[index])) < SAME_PICTURE - 0.01:
            keep.append(index)
    by_identity: dict[str, list[int]] = {}
    for new, old in enumerate(keep):
        by_identity.setdefault(owner[old], []).append(new)
    return Pool([jpegs[i] for i in keep], [owner[i] for i in keep], by_identity, references[keep], model)


# -- what an identity holds, and the calls that change it --------------------------------------
@dataclass(frozen=True)
class Held:
    """What one identity holds: its pictures (sorted ids, repeats allowed) and the metadata's
    call id, which names the last call applied to it."""

    pictures: tuple[int, ...]
    op: str


@dataclass(frozen=True)
class Call:
    op_id: str
    kind: CallKind
    identity: str
    pictures: tuple[int, ...] = ()

    @property
    def rpc(self) -> str:
        """The call name the audit log records."""
        return {"add": "Enroll", "replace": "Enroll(replace)", "remove": "RemoveIdentity"}[self.kind]


def apply_call(held: Held | None, call: Call) -> Held | None:
    """The identity after `call`, applied whole."""
    if call.kind == "remove":
        return None
    kept = held.pictures if held is not None and call.kind == "add" else ()
    return Held(tuple(sorted(kept + call.pictures)), call.op_id)


@dataclass
class CallResult:
    call: Call
    status: Literal["ok", "uncertain", "refused"]
    added: int | None = None      # EnrollResponse.templates_added
    total: int | None = None      # EnrollResponse.templates_total
    removed: int | None = None    # RemoveIdentityResponse.templates_removed
    error: str = ""


def choose_call(rng: random.Random, identity: str, held: Held | None, pictures: Sequence[int], op_id: str,
                max_pictures: int) -> Call:
    """A random call that the server must accept: never a removal of an absent identity, never
    an add past `max_pictures` (both would be refused, deterministically, and prove nothing)."""
    count = rng.randint(1, 3)
    chosen = tuple(rng.choice(pictures) for _ in range(count))  # repeats allowed: a picture enrolled twice
    if held is None:
        return Call(op_id, "add", identity, chosen)
    roll = rng.random()
    if roll < 0.25:
        return Call(op_id, "remove", identity)
    if roll < 0.6 or len(held.pictures) + count > max_pictures:
        return Call(op_id, "replace", identity, chosen)
    return Call(op_id, "add", identity, chosen)


# -- the server process ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`facelink cloud serve` in its own process; stderr goes to a log file (a pipe nobody reads
    would block the server once full)."""

    def __init__(self, gallery_dir: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "facelink.cli", "cloud", "serve", "--gallery", str(gallery_dir),
                   "--port", str(self.port)]
        self.started = time.perf_counter()
        with log_path.open("a") as log:
            log.write(f"--- start {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from the process start until its health check says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        serving = health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving:
                        return time.perf_counter() - self.started
                except grpc.RpcError:
                    time.sleep(0.05)
        raise TimeoutError(f"the server did not start in {timeout:.0f} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def create_tokens(gallery_dir: Path, clients: int) -> tuple[list[str], str]:
    """One token per client (enroll, remove, read) and one for the checks (read, recognize),
    written to GALLERY/auth.json before the server starts."""
    from facelink.cloud.auth import AuthStore

    store = AuthStore(gallery_dir / "auth.json")
    tokens = [store.create_token(f"crash-client-{i}", SCOPES_CLIENT)[1] for i in range(clients)]
    return tokens, store.create_token("crash-checker", SCOPES_CHECKER)[1]


@contextmanager
def channel_to(address: str, token: str) -> Iterator[grpc.Channel]:
    from pydantic import SecretStr

    from facelink.transport import ClientSecurity, client_channel

    channel = client_channel(address, ClientSecurity(token=SecretStr(token)))
    try:
        yield channel
    finally:
        channel.close()


# -- the clients -------------------------------------------------------------------------------
def send_call(stub: Any, pool: Pool, call: Call) -> CallResult:  # noqa: ANN401 - a GalleryStub
    """Make one Gallery call; an error is 'uncertain' unless the server answered a refusal."""
    from facelink.v1 import common_pb2, gallery_pb2

    try:
        if call.kind == "remove":
            removal = gallery_pb2.RemoveIdentityRequest(identity=call.identity)
            reply = stub.RemoveIdentity(removal, timeout=CALL_TIMEOUT_S)
            return CallResult(call, "ok", removed=reply.templates_removed)
        jpeg = common_pb2.IMAGE_FORMAT_JPEG
        images = [gallery_pb2.EnrollImage(image=common_pb2.Image(format=jpeg, data=pool.jpegs[p]))
                  for p in call.pictures]
        request = gallery_pb2.EnrollRequest(identity=call.identity, images=images, replace=call.kind == "replace",
                                            metadata={"op": call.op_id})
        reply = stub.Enroll(request, timeout=CALL_TIMEOUT_S)
        return CallResult(call, "ok", added=reply.templates_added, total=reply.templates_total)
    except grpc.RpcError as error:
        code = error.code()
        status = "uncertain" if code in UNCERTAIN_CODES else "refused"
        return CallResult(call, status, error=f"{code.name}: {error.details()}")


@dataclass
class Client:
    """One enrolling client: its identities, the state it believes they are in, its calls."""

    index: int
    token: str
    identities: list[str]
    held: dict[str, Held | None]
    rng: random.Random
    results: list[CallResult] = field(default_factory=list)
    busy: bool = False  # a call is in flight (read by the killer, for the report)

    def run(self, address: str, pool: Pool, round_index: int, stop: threading.Event,
            max_pictures: int) -> None:
        """Call until the first failure (the kill) or `stop`; the first failure ends the client,
        since after it the state of that identity is unknown until the checks resolve it."""
        from facelink.v1 import gallery_pb2_grpc

        with channel_to(address, self.token) as channel:
            stub = gallery_pb2_grpc.GalleryStub(channel)
            while not stop.is_set():
                identity = self.rng.choice(self.identities)
                op_id = f"r{round_index}c{self.index}n{len(self.results)}"
                call = choose_call(self.rng, identity, self.held[identity], pool.by_identity[identity], op_id,
                                   max_pictures)
                self.busy = True
                result = send_call(stub, pool, call)
                self.busy = False
                self.results.append(result)
                if result.status != "ok":
                    return
                self.held[identity] = apply_call(self.held[identity], call)


# -- what the gallery holds after the restart ---------------------------------------------------
@dataclass
class Snapshot:
    held: dict[str, Held]                 # identity -> what its stored templates and metadata say
    pictures: dict[str, int]              # identity -> pictures as ListIdentities must count them
    metadata: dict[str, dict[str, str]]
    defects: dict[str, list[str]]         # identity -> what is structurally wrong ("" : the whole file)


def read_gallery(db: Path, pool: Pool) -> Snapshot:
    """Read the SQLite file directly (read-only, beside the running server) and judge its shape."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        orphans = connection.execute("PRAGMA foreign_key_check").fetchall()
        identities = connection.execute("SELECT id, name, metadata FROM identities").fetchall()
        templates = connection.execute(
            "SELECT identity_id, model_id, source, vector FROM templates ORDER BY id").fetchall()
    finally:
        connection.close()
    snapshot = Snapshot({}, {}, {}, {})
    if integrity != ["ok"]:
        snapshot.defects.setdefault("", []).append(f"integrity_check: {integrity[:5]}")
    if orphans:
        snapshot.defects.setdefault("", []).append(f"{len(orphans)} rows break a foreign key: {orphans[:5]}")
    models = {row[1] for row in templates} | {pool.primary_model}
    rows_of: dict[int, list[tuple[str, str | None, bytes]]] = {}
    for identity_id, model, source, vector in templates:
        rows_of.setdefault(identity_id, []).append((model, source, vector))
    for identity_id, name, metadata in identities:
        _read_identity(snapshot, name, json.loads(metadata), rows_of.get(identity_id, []), models, pool)
    return snapshot


def _read_identity(snapshot: Snapshot, name: str, metadata: dict[str, str],
                   rows: list[tuple[str, str | None, bytes]], models: set[str], pool: Pool) -> None:
    """One identity's Held, picture count and metadata into `snapshot`, and what is wrong with it."""
    defects = snapshot.defects.setdefault(name, [])
    per_model = Counter(model for model, _, _ in rows)
    if len(set(per_model[m] for m in models)) > 1:  # every call writes one template per model and picture
        defects.append(f"templates per model disagree: {dict(per_model)}")
    models_of_picture: dict[str | None, Counter[str]] = {}
    for model, source, _ in rows:
        models_of_picture.setdefault(source, Counter())[model] += 1
    torn = [s for s, c in models_of_picture.items() if s is None or set(c) != models or max(c.values()) > 1]
    if torn:
        defects.append(f"{len(torn)} picture keys without exactly one template per model")
    dim = pool.references.shape[1]  # the server writes float16 or float32: told by the blob's length
    decoded = [decode_vector(v, dim) for m, _, v in rows if m == pool.primary_model]
    if any(v is None for v in decoded):
        defects.append(f"a {pool.primary_model} vector blob fits neither float16 nor float32 of {dim} values")
    primary = [v for v in decoded if v is not None]
    pictures = _recognise_pictures(primary, pool, defects)
    if set(metadata) != {"op"}:
        defects.append(f"metadata is {sorted(metadata)}, expected exactly 'op'")
    snapshot.held[name] = Held(pictures, metadata.get("op", ""))
    snapshot.pictures[name] = max(per_model.values(), default=0)
    snapshot.metadata[name] = metadata
    if not defects:
        del snapshot.defects[name]


def _recognise_pictures(vectors: list[np.ndarray], pool: Pool, defects: list[str]) -> tuple[int, ...]:
    """Which pool picture each stored template is (sorted ids); one that is none is a defect."""
    if not vectors:
        return ()
    stacked = np.stack(vectors).astype(np.float32)
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True)
    similarity = stacked @ pool.references.T
    best = similarity.argmax(axis=1)
    unknown = int((similarity[np.arange(len(best)), best] < SAME_PICTURE).sum())
    if unknown:
        defects.append(f"{unknown} templates are none of the enrolled pictures")
    return tuple(sorted(int(b) for b in best))


def list_identities(address: str, token: str) -> tuple[dict[str, Any], int]:
    """Every page of ListIdentities: {identity: IdentityInfo}, and the total the server reports."""
    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    found: dict[str, Any] = {}
    token_page, total = "", 0
    with channel_to(address, token) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        while True:
            reply = stub.ListIdentities(gallery_pb2.ListIdentitiesRequest(page_size=7, page_token=token_page),
                                        timeout=CALL_TIMEOUT_S)  # small pages: the paging is checked too
            found.update({info.identity: info for info in reply.identities})
            total, token_page = reply.total, reply.next_page_token
            if not token_page:
                return found, total


def compare_listing(snapshot: Snapshot, listed: dict[str, Any], total: int) -> list[str]:
    """Where ListIdentities disagrees with the stored templates."""
    problems = []
    if set(listed) != set(snapshot.held) or total != len(snapshot.held):
        problems.append(f"ListIdentities lists {sorted(listed)} (total {total}), "
                        f"the file holds {sorted(snapshot.held)}")
    for name, info in listed.items():
        if name not in snapshot.held:
            continue
        said, stored = (info.templates, dict(info.metadata)), (snapshot.pictures[name], snapshot.metadata[name])
        if said != stored:
            problems.append(f"ListIdentities says {name} holds {said} (pictures, metadata), the file {stored}")
    return problems


def recognises(address: str, token: str, pool: Pool, identity: str, picture: int) -> str:
    """'' if the server names `identity` from one of its enrolled pictures, else what went wrong."""
    from facelink.v1 import common_pb2, recognition_pb2, recognition_pb2_grpc

    observation = recognition_pb2.FaceObservation(
        camera_id="crash-check", request_id=1,
        image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=pool.jpegs[picture]),
    )
    with channel_to(address, token) as channel:
        stub = recognition_pb2_grpc.RecognitionStub(channel)
        try:
            results = list(stub.Recognize(iter([observation]), timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as error:
            return f"Recognize failed: {error.code().name}: {error.details()}"
    match = recognition_pb2.DECISION_MATCH
    if len(results) != 1 or results[0].decision != match or results[0].identity != identity:
        got = [(recognition_pb2.Decision.Name(r.decision), r.identity, r.error.message) for r in results]
        return f"picture {picture} of {identity} was answered {got}"
    return ""


# -- judging one identity ----------------------------------------------------------------------
@dataclass
class Verdict:
    outcome: Literal["ok", "lost", "half-applied"]
    lost_calls: int = 0                                  # acknowledged calls whose effect is gone
    pending: Literal["none", "applied", "not applied"] = "none"
    pending_kind: str = ""                               # add, replace or remove: the unacknowledged call
    pending_recorded: bool | None = None                 # None: no pending call, or the audit did not say
    ack_mismatches: int = 0                              # replies that contradict the history
    audit_problem: str = ""
    detail: str = ""


def judge_identity(start: Held | None, results: Sequence[CallResult], actual: Held | None,
                   defects: Sequence[str]) -> Verdict:
    """Compare what an identity holds with the calls made on it in this round.

    history[i] is the state after the first i acknowledged calls. The found state must be the last
    one, or that with the unacknowledged call applied whole. An earlier state of the history means
    the acknowledged calls after it were lost, and so does an acknowledged state missing some or
    all of its pictures and holding nothing else; anything else is half-applied.
    """
    acked = [r for r in results if r.status == "ok"]
    pending = next((r.call for r in results if r.status == "uncertain"), None)
    history = [start]
    for result in acked:
        history.append(apply_call(history[-1], result.call))
    verdict = Verdict("ok", ack_mismatches=_reply_mismatches(acked, history))
    verdict.pending_kind = pending.kind if pending else ""
    if defects:
        verdict.outcome, verdict.detail = "half-applied", "; ".join(defects)
    elif actual == history[-1]:
        verdict.pending = "not applied" if pending else "none"
    elif pending is not None and actual == apply_call(history[-1], pending):
        verdict.pending = "applied"
    elif actual in history:
        last = max(i for i, state in enumerate(history) if state == actual)
        verdict.outcome, verdict.lost_calls = "lost", len(history) - 1 - last
        verdict.detail = f"holds {actual}, its state before its last {verdict.lost_calls} acknowledged call(s)"
    elif _lost_pictures(actual, history[-1]):
        verdict.outcome, verdict.lost_calls = "lost", 1
        verdict.detail = f"holds {actual}, a part of its acknowledged state {history[-1]}"
    else:
        verdict.outcome = "half-applied"
        verdict.detail = f"holds {actual}; acknowledged: {history[-1]}; with the unacknowledged call: " \
                         f"{apply_call(history[-1], pending) if pending else '-'}"
    return verdict


def _lost_pictures(actual: Held | None, acknowledged: Held | None) -> bool:
    """Whether `actual` is `acknowledged` with pictures (or the whole identity) gone, nothing added."""
    if acknowledged is None or actual == acknowledged:
        return False
    if actual is None:
        return True
    return actual.op == acknowledged.op and Counter(actual.pictures) <= Counter(acknowledged.pictures)


def _reply_mismatches(acked: Sequence[CallResult], history: Sequence[Held | None]) -> int:
    """Acknowledged replies whose counts contradict the history (templates_total and friends)."""
    wrong = 0
    for i, result in enumerate(acked):
        before, after = history[i], history[i + 1]
        if result.call.kind == "remove":
            wrong += result.removed != (len(before.pictures) if before else -1)
        else:
            expected = (len(result.call.pictures), len(after.pictures) if after else -1)
            wrong += (result.added, result.total) != expected
    return wrong


def audit_entry(call: Call, before: Held | None) -> AuditEntry:
    """(call, counts) the audit log records for `call` applied to `before`, with outcome ok."""
    after = apply_call(before, call)
    if call.kind == "remove":
        return call.rpc, {"templates": len(before.pictures) if before else 0}
    total = len(after.pictures) if after else 0
    return call.rpc, {"pictures": len(call.pictures), "added": len(call.pictures), "total": total}


def judge_audit(verdict: Verdict, start: Held | None, results: Sequence[CallResult],
                recorded: Sequence[AuditEntry]) -> None:
    """The round's ok records of one identity must be its acknowledged calls in order, then at
    most the unacknowledged one; a record of an unacknowledged call that was not applied is wrong."""
    state, expected = start, []
    pending: AuditEntry | None = None
    for result in results:
        if result.status == "ok":
            expected.append(audit_entry(result.call, state))
            state = apply_call(state, result.call)
        elif result.status == "uncertain":
            pending = audit_entry(result.call, state)
    recorded = list(recorded)
    if recorded == expected:
        verdict.pending_recorded = False if pending else None
    elif pending is not None and recorded == [*expected, pending]:
        verdict.pending_recorded = True
        if verdict.pending == "not applied":
            verdict.audit_problem = "records an unacknowledged call that was not applied"
    else:
        maybe = f" (+ maybe {pending})" if pending else ""
        verdict.audit_problem = f"ok records {recorded}, expected {expected}{maybe}"


# -- a round -----------------------------------------------------------------------------------
@dataclass
class Workspace:
    """What lives through every round: the gallery, the credentials, the pool, the running server."""

    gallery_dir: Path
    log_path: Path
    pool: Pool
    tokens: list[str]
    checker: str
    owners: list[list[str]]            # client -> its identities
    sentinel: str
    state: dict[str, Held | None]      # identity -> what it held at the end of the last round
    server: Server
    audit_records: int = 0             # lines of the audit log already judged


@dataclass
class RoundResult:
    """One round: how it was killed, and what the checks counted (filled in by check_round)."""

    round: int
    kill: str                          # "uniform", or "after WAL write"
    delay_s: float                     # the random delay before the kill (or the WAL wait)
    in_flight_at_kill: int
    restart_s: float                   # process start -> health check SERVING
    audit_torn_before_restart: bool
    acknowledged: dict[str, int] = field(default_factory=dict)  # call kind -> acknowledged calls
    unacknowledged: int = 0            # calls that failed at the kill
    pending_applied: int = 0           # ... and were applied whole
    pending_applied_unrecorded: int = 0  # ... applied, with no audit record
    pending_applied_intent_only: int = 0  # ... of those, with their intent (outcome "started") recorded
    unrecorded_kinds: dict[str, int] = field(default_factory=dict)  # ... of those, per call kind
    pending_recorded: int = 0          # ... with an ok audit record
    refused: int = 0                   # calls the server refused (none expected)
    lost: int = 0                      # acknowledged calls whose effect is gone
    half_applied: int = 0              # identities in a state no sequence of whole calls makes
    ack_mismatches: int = 0            # replies whose counts contradict the history
    audit_mismatches: int = 0
    gallery_defects: int = 0           # integrity, foreign keys, ListIdentities against the file
    recognition_failures: int = 0
    problems: list[str] = field(default_factory=list)


def prepare(workdir: Path, pool: Pool, clients: int, per_client: int) -> Workspace:
    """Tokens, the first server, and the sentinel enrolled (acknowledged) before round 1."""
    from facelink.v1 import gallery_pb2_grpc

    gallery_dir, log_path = workdir / "gallery", workdir / "server.log"
    tokens, checker = create_tokens(gallery_dir, clients)
    names = sorted(pool.by_identity)
    if len(names) < clients * per_client + 1:
        raise ValueError(f"{len(names)} identities in the pool, {clients * per_client + 1} needed")
    sentinel, rest = names[0], names[1:]
    owners = [rest[i * per_client:(i + 1) * per_client] for i in range(clients)]
    server = Server(gallery_dir, log_path)
    server.wait_ready()
    call = Call("sentinel", "add", sentinel, tuple(pool.by_identity[sentinel][:2]))
    with channel_to(server.address, tokens[0]) as channel:
        result = send_call(gallery_pb2_grpc.GalleryStub(channel), pool, call)
    if result.status != "ok":
        raise RuntimeError(f"enrolling the sentinel failed: {result.error}")
    state: dict[str, Held | None] = {name: None for name in names}
    state[sentinel] = apply_call(None, call)
    return Workspace(gallery_dir, log_path, pool, tokens, checker, owners, sentinel, state, server,
                     _audit_lines(gallery_dir / "audit.jsonl"))


def _audit_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def run_round(ws: Workspace, index: int, rng: random.Random, max_delay: float, max_pictures: int,
              after_commit: bool = False, tamper: Callable[[Path], None] | None = None) -> RoundResult:
    """Clients, a SIGKILL at a random moment, a restart, and every check; leaves the new server in ws.

    `after_commit` waits, after the random delay, for the next write to the database's WAL and
    kills right then: between a commit and its audit record and reply, the window a uniform
    moment rarely hits. `tamper(gallery_dir)` runs between the kill and the restart (the tests
    damage the gallery with it, to prove the checks see damage).
    """
    clients = [Client(i, ws.tokens[i], names, {n: ws.state[n] for n in names}, random.Random(rng.random()))
               for i, names in enumerate(ws.owners)]
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(ws.server.address, ws.pool, index, stop, max_pictures),
                                daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    delay = rng.uniform(0.05, max_delay)
    time.sleep(delay)
    if after_commit:
        wait_for_wal_write(ws.gallery_dir / "gallery.sqlite3-wal", timeout=5.0)
    in_flight = sum(c.busy for c in clients)
    ws.server.kill()
    stop.set()  # the clients end at their next failed call, which the kill makes immediate
    for thread in threads:
        thread.join(CALL_TIMEOUT_S + 5)
    # Before the restart: a torn last line is possible here, and the restart's AuditLog cuts it.
    torn = not _audit_intact(ws.gallery_dir / "audit.jsonl")
    if tamper is not None:
        tamper(ws.gallery_dir)
    ws.server = Server(ws.gallery_dir, ws.log_path)
    restart_s = ws.server.wait_ready()
    result = RoundResult(index, "after WAL write" if after_commit else "uniform", round(delay, 3), in_flight,
                         round(restart_s, 3), torn)
    check_round(ws, clients, result, rng)
    return result


def wait_for_wal_write(wal: Path, timeout: float) -> bool:
    """Poll the WAL file until its size or mtime changes (a transaction's frames were written, or
    a checkpoint truncated it); False after `timeout`. Polled every 0.2 ms: the point is to kill
    within a few ms of the commit."""
    def signature() -> tuple[int, int]:
        try:
            stat = wal.stat()
            return stat.st_size, stat.st_mtime_ns
        except FileNotFoundError:
            return -1, -1

    first, deadline = signature(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if signature() != first:
            return True
        time.sleep(0.0002)
    return False


def _audit_intact(path: Path) -> bool:
    from facelink.cloud.audit import verify_audit

    return verify_audit(path)[0]


def check_round(ws: Workspace, clients: Sequence[Client], result: RoundResult, rng: random.Random) -> None:
    """Every check of the restarted server and its gallery, counted into `result`; then the
    workspace's state becomes what was found, for the next round."""
    from facelink.cloud.audit import verify_audit

    snapshot = read_gallery(ws.gallery_dir / "gallery.sqlite3", ws.pool)
    listed, total = list_identities(ws.server.address, ws.checker)
    file_problems = [*snapshot.defects.get("", []), *compare_listing(snapshot, listed, total)]
    audit_ok, audit_summary = verify_audit(ws.gallery_dir / "audit.jsonl")
    calls = [r for c in clients for r in c.results]
    records, started = _round_records(ws)
    verdicts = judge_all(ws.state, calls, snapshot, records)
    recognition = _check_recognition(ws, snapshot, rng)
    _count(result, calls, verdicts)
    # The server records a gallery call's intent before its commit: an applied call killed before
    # its outcome was written still has that record (more "started" than "ok" for its identity).
    result.pending_applied_intent_only = sum(
        v.pending == "applied" and v.pending_recorded is False and started.get(name, 0) > len(records.get(name, []))
        for name, v in verdicts.items()
    )
    result.audit_mismatches += not audit_ok
    result.gallery_defects, result.recognition_failures = len(file_problems), len(recognition)
    result.problems = [
        *file_problems,
        *(f"{name}: {v.outcome}: {v.detail}" for name, v in verdicts.items() if v.outcome != "ok"),
        *(f"{name}: audit: {v.audit_problem}" for name, v in verdicts.items() if v.audit_problem),
        *([] if audit_ok else [f"audit log: {audit_summary}"]),
        *recognition,
    ]
    ws.state = {name: snapshot.held.get(name) for name in ws.state}  # the next round starts from here


def judge_all(state: dict[str, Held | None], calls: Sequence[CallResult], snapshot: Snapshot,
              recorded: dict[str, list[AuditEntry]]) -> dict[str, Verdict]:
    """A verdict per identity: each of this run's, and any other the file holds (which is a defect)."""
    verdicts = {}
    for name in sorted(set(state) | set(snapshot.held)):
        mine = [r for r in calls if r.call.identity == name]
        defects = snapshot.defects.get(name, []) + ([] if name in state else ["not an identity of this run"])
        verdict = judge_identity(state.get(name), mine, snapshot.held.get(name), defects)
        judge_audit(verdict, state.get(name), mine, recorded.get(name, []))
        verdicts[name] = verdict
    return verdicts


def _count(result: RoundResult, calls: Sequence[CallResult], verdicts: dict[str, Verdict]) -> None:
    v = list(verdicts.values())
    result.acknowledged = dict(Counter(r.call.kind for r in calls if r.status == "ok"))
    result.unacknowledged = sum(r.status == "uncertain" for r in calls)
    result.refused = sum(r.status == "refused" for r in calls)
    result.pending_applied = sum(x.pending == "applied" for x in v)
    unrecorded = [x.pending_kind for x in v if x.pending == "applied" and x.pending_recorded is False]
    result.pending_applied_unrecorded, result.unrecorded_kinds = len(unrecorded), dict(Counter(unrecorded))
    result.pending_recorded = sum(bool(x.pending_recorded) for x in v)
    result.lost = sum(x.lost_calls for x in v)
    result.half_applied = sum(x.outcome == "half-applied" for x in v)
    result.ack_mismatches = sum(x.ack_mismatches for x in v)
    result.audit_mismatches = sum(bool(x.audit_problem) for x in v)


def _round_records(ws: Workspace) -> tuple[dict[str, list[AuditEntry]], Counter[str]]:
    """The audit log's ok records of gallery changes since the last round, per identity, in order;
    and how many intent ("started") records each identity got."""
    lines = (ws.gallery_dir / "audit.jsonl").read_bytes().splitlines()
    by_identity: dict[str, list[AuditEntry]] = {}
    started: Counter[str] = Counter()
    for line in lines[ws.audit_records:]:
        record = json.loads(line)
        if record["call"] not in ("Enroll", "Enroll(replace)", "RemoveIdentity"):
            continue
        if record["outcome"] == "ok":
            by_identity.setdefault(record["identity"], []).append((record["call"], record["counts"]))
        elif record["outcome"] == "started":
            started[record["identity"]] += 1
    ws.audit_records = len(lines)
    return by_identity, started


def _check_recognition(ws: Workspace, snapshot: Snapshot, rng: random.Random) -> list[str]:
    """The restarted server names the sentinel and one other enrolled identity from a picture."""
    others = sorted(n for n in snapshot.held if n != ws.sentinel and snapshot.held[n].pictures)
    names = [ws.sentinel, *rng.sample(others, k=min(1, len(others)))]
    problems = []
    for name in names:
        held = snapshot.held.get(name)
        if held is None or not held.pictures:
            problems.append(f"recognition: {name} is not enrolled")
            continue
        problem = recognises(ws.server.address, ws.checker, ws.pool, name, rng.choice(held.pictures))
        problems += [f"recognition: {problem}"] if problem else []
    return problems


# -- the run -----------------------------------------------------------------------------------
def run_rounds(rounds: int, *, clients: int = 4, per_client: int = 3, max_delay: float = 1.5, seed: int = 0,
               after_commit_share: float = 0.25, max_pictures: int = 6, data: str | None = None,
               workdir: Path | None = None, pool: Pool | None = None,
               tamper: Callable[[int, Path], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Prepare a gallery, run `rounds` kill-and-restart rounds on it; the results as a dict.

    Every round whose index i has floor(i * share) > floor((i - 1) * share) kills right after a
    WAL write instead of at a uniform moment: a fixed, even share of the rounds. `pool` reuses
    pictures already loaded (the tests share one); `tamper(round, gallery_dir)` see `run_round`.
    """
    pool = pool or load_pool(clients * per_client + 1, PICTURES_PER_IDENTITY, seed, data)
    with _workdir(workdir) as folder:
        ws = prepare(folder, pool, clients, per_client)
        rows: list[RoundResult] = []
        try:
            for index in range(1, rounds + 1):
                after_commit = int(index * after_commit_share) > int((index - 1) * after_commit_share)
                damage = (lambda gallery, i=index: tamper(i, gallery)) if tamper else None
                rng = random.Random(seed * 1_000_003 + index)
                rows.append(run_round(ws, index, rng, max_delay, max_pictures, after_commit, damage))
                if progress:
                    _print_progress(rows[-1])
        finally:
            ws.server.stop()
    return summarise(rows, pool, {"clients": clients, "identities_per_client": per_client,
                                  "max_pictures_per_identity": max_pictures, "max_delay_s": max_delay,
                                  "after_commit_share": after_commit_share, "seed": seed})


@contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="facelink-crash-") as tmp:
        yield Path(tmp)


def _print_progress(row: RoundResult) -> None:
    acked = sum(row.acknowledged.values())
    flag = "" if not row.problems else f"  PROBLEMS: {row.problems[:3]}"
    print(f"round {row.round} ({row.kill} kill): killed after {row.delay_s:.2f} s, {row.in_flight_at_kill} calls "
          f"in flight; {acked} acknowledged, {row.unacknowledged} not ({row.pending_applied} of them applied, "
          f"{row.pending_applied_unrecorded} without audit record); lost {row.lost}, "
          f"half-applied {row.half_applied}; restart {row.restart_s:.2f} s{flag}", flush=True)


_SUMMED = ("unacknowledged", "pending_applied", "pending_applied_unrecorded", "pending_applied_intent_only",
           "pending_recorded", "refused",
           "lost", "half_applied", "ack_mismatches", "audit_mismatches", "gallery_defects",
           "recognition_failures")


def totals(rows: Sequence[RoundResult]) -> dict[str, Any]:
    """Counts over `rows`: what the table shows for one kind of kill, or for all rounds."""
    acked: Counter[str] = Counter()
    unrecorded: Counter[str] = Counter()
    for r in rows:
        acked.update(r.acknowledged)
        unrecorded.update(r.unrecorded_kinds)
    restart = [r.restart_s for r in rows]
    return {
        "rounds": len(rows),
        "acknowledged": {"add": acked["add"], "replace": acked["replace"], "remove": acked["remove"],
                         "total": sum(acked.values())},
        **{key: sum(getattr(r, key) for r in rows) for key in _SUMMED},
        "unrecorded_kinds": {kind: unrecorded[kind] for kind in ("add", "replace", "remove")},
        "rounds_with_calls_in_flight_at_kill": sum(r.in_flight_at_kill > 0 for r in rows),
        "audit_torn_before_restart": sum(r.audit_torn_before_restart for r in rows),
        "restart_s_median": round(float(np.median(restart)), 3) if restart else None,
        "restart_s_max": round(max(restart), 3) if restart else None,
        "rounds_with_problems": sum(bool(r.problems) for r in rows),
    }


def summarise(rows: Sequence[RoundResult], pool: Pool, setup: dict[str, Any]) -> dict[str, Any]:
    kinds = sorted({r.kill for r in rows}, reverse=True)  # "uniform" first
    return {
        "benchmark": "crash_durability",
        "setup": {**setup, "pictures_in_pool": len(pool.jpegs), "primary_model": pool.primary_model},
        "summary": totals(rows),
        "by_kill": {kind: totals([r for r in rows if r.kill == kind]) for kind in kinds},
        "rounds": [asdict(r) for r in rows],
    }


def _table_row(label: str, s: dict[str, Any]) -> list[str]:
    a = s["acknowledged"]
    restart = "-" if s["restart_s_median"] is None else f"{s['restart_s_median']:.2f} / {s['restart_s_max']:.2f}"
    unaudited = s["pending_applied_unrecorded"]
    unacknowledged = f"{s['unacknowledged']}: {s['pending_applied']} applied ({unaudited} unaudited)"
    counts = [str(s[key]) for key in ("lost", "half_applied", "audit_mismatches", "ack_mismatches",
                                      "gallery_defects", "recognition_failures")]
    return [label, str(s["rounds"]), f"{a['total']} ({a['add']}/{a['replace']}/{a['remove']})", *counts,
            unacknowledged, restart]


def format_report(payload: dict[str, Any]) -> str:
    header = ["kill", "rounds", "acknowledged (add/replace/remove)", "lost", "half-applied", "audit mismatches",
              "reply mismatches", "gallery defects", "recognition failures", "unacknowledged",
              "restart s (median/max)"]
    rows = [_table_row(kind, s) for kind, s in payload["by_kill"].items()]
    rows.append(_table_row("all", payload["summary"]))
    s, setup = payload["summary"], payload["setup"]
    return "\n".join([
        f"command: {payload['command']}",
        reporting.machine_line(payload["machine"]),
        f"date: {payload['date']}",
        f"setup: {setup['clients']} clients x {setup['identities_per_client']} identities, "
        f"{setup['pictures_in_pool']} LFW pictures ({setup['primary_model']}), "
        f"SIGKILL after U(0.05, {setup['max_delay_s']}) s, {setup['after_commit_share']:.0%} of rounds then "
        f"at the next WAL write; seed {setup['seed']}",
        "",
        *reporting.markdown_table(header, rows),
        "",
        "unacknowledged = calls in flight at the kill: applied whole or not at all; 'unaudited' = applied "
        "without an audit record (killed between the commit and the record)",
        f"rounds with calls in flight at the kill: {s['rounds_with_calls_in_flight_at_kill']} of "
        f"{s['rounds']}; "
        f"audit log with a torn last line before the restart: {s['audit_torn_before_restart']}; "
        f"unacknowledged calls recorded as ok: {s['pending_recorded']}; refused calls: {s['refused']}",
        "applied without an audit record, by call: "
        + ", ".join(f"{kind} {n}" for kind, n in s["unrecorded_kinds"].items()),
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m facelink.benchmarks.crash_durability",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="kill-and-restart rounds (default 100)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent enrolling clients (default 4)")
    parser.add_argument("--identities-per-client", type=int, default=3,
                        help="identities each client owns (default 3)")
    parser.add_argument("--max-delay", type=float, default=1.5,
                        help="latest kill after the clients start, s (default 1.5)")
    parser.add_argument("--after-commit-share", type=float, default=0.25,
                        help="share of rounds killed at the first WAL write after the delay (default 0.25)")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the people and every random choice (default 0)")
    parser.add_argument("--data", help="LFW folder (default: ../shared)")
    parser.add_argument("--workdir", type=Path,
                        help="keep the gallery and server log here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=reporting.RESULTS_DIR / "crash_durability.json",
                        help="where to write the results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(reporting.bench_argv(argv))
    payload = run_rounds(args.rounds, clients=args.clients, per_client=args.identities_per_client,
                         max_delay=args.max_delay, seed=args.seed, after_commit_share=args.after_commit_share,
                         data=args.data, workdir=args.workdir, progress=True)
    command = f"python -m facelink.benchmarks.crash_durability {shlex.join(reporting.bench_argv(argv))}"
    payload = {"benchmark": payload.pop("benchmark"), "command": command,
               "date": reporting.utc_now(), "machine": reporting.machine_info(), **payload}
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0 if durable(payload["summary"]) else 1


def durable(summary: dict[str, Any]) -> bool:
    """Nothing acknowledged lost, nothing half-applied, nothing the checks found wrong."""
    return not any(summary[key] for key in ("lost", "half_applied", "ack_mismatches", "audit_mismatches",
                                            "gallery_defects", "recognition_failures"))


if __name__ == "__main__":
    raise SystemExit(main())
