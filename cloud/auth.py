"""Who is calling, and what they may do: principals, scopes, bearer tokens, one interceptor.

Every RPC passes through `AuthInterceptor` before any servicer code runs. It names the
principal (a bearer token from the `authorization` metadata, else the verified client
certificate of a mutual-TLS connection), checks that the method's scope is among the
principal's, applies the principal's rate limit, and turns anything a handler raises into a
typed status, so that no Python exception text ever reaches a client. Health checks are the
one open service: a load balancer must see a server that is up without holding a credential.

Scopes (least privilege: a token or certificate gets exactly the ones it is given):
    recognize   stream faces (Recognize), read capabilities                     devices
    embeddings  send embeddings of the gallery models themselves (not query models)
    scores      exact cosine scores and the nearest identity of an UNKNOWN face (evaluation);
                others get MATCH scores rounded and nothing of an UNKNOWN
    enroll      add or replace an identity's pictures
    remove      erase an identity
    read        list identities
    unknowns    list unknown people with their crops, erase them; with enroll, name them
    admin       all of the above, server reflection, the audit log

Why `embeddings` and `scores` are separate: with a gallery model's embedding space open and
exact scores returned, about a hundred queries climb from a random vector to a stored
template (cosine 1.0). A device sends query-model embeddings or coded faces and needs a
decision, not the score's last digits.

Tokens are random 256-bit secrets shown once at creation; only their SHA-256 is stored
(`auth.json`, mode 0600, beside the gallery). The file is re-read when it changes, so
`facelink cloud token revoke` takes effect on a running server within a second.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from .errors import InvalidArgument, PermissionDenied, ResourceExhausted, ServiceError, Unauthenticated

log = logging.getLogger(__name__)

SCOPES = ("recognize", "embeddings", "scores", "enroll", "remove", "read", "unknowns", "admin")
#: What a verified client certificate that no grant names may do: it is a device.
DEVICE_SCOPES = frozenset({"recognize"})
TOKEN_PREFIX = "flk"
_TOKEN_RE = re.compile(r"^flk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")

HEALTH_SERVICE = "/grpc.health.v1.Health/"
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
#: The scope each facelink.v1 method needs. A method not listed here is refused: a new RPC
#: must be given a scope before anyone can call it.
METHOD_SCOPES = {
    "/facelink.v1.Recognition/Recognize": "recognize",
    "/facelink.v1.Recognition/GetCapabilities": "recognize",
    "/facelink.v1.Gallery/Enroll": "enroll",
    "/facelink.v1.Gallery/RemoveIdentity": "remove",
    "/facelink.v1.Gallery/ListIdentities": "read",
    # Pictures of people who never enrolled: a scope of their own. EnrollUnknown also needs
    # `enroll`, which GalleryService.EnrollUnknown checks (one scope per method here).
    "/facelink.v1.Gallery/ListUnknowns": "unknowns",
    "/facelink.v1.Gallery/EnrollUnknown": "unknowns",
    "/facelink.v1.Gallery/ForgetUnknown": "unknowns",
}


@dataclass(frozen=True)
class Principal:
    name: str
    kind: str  # "token" or "certificate"
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


#: The principal of the call being served (set by the interceptor, read by the servicers).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    unknown = sorted(chosen - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; scopes are {', '.join(SCOPES)}")
    if not chosen:
        raise ValueError(f"give at least one scope ({', '.join(SCOPES)})")
    return chosen


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r}: 1-64 characters, letters, digits and _ . @ : - (not first)")
    return name


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    name: str
    scopes: frozenset[str]
    sha256: str
    created: str
    expires: str | None = None
    revoked: str | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked is None and (self.expires is None or datetime.fromisoformat(self.expires) > now)


@dataclass
class _State:
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    subjects: dict[str, frozenset[str]] = field(default_factory=dict)  # certificate CN -> scopes


class AuthStore:
    """Tokens (hashed) and certificate grants in one JSON file, written atomically (0600).

    The CLI edits the file while a server runs; the server re-reads it when its modification
    time changes (checked at most once a second), never writes it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._state = _State()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._reload(force=True)

    # -- reading ---------------------------------------------------------------------------
    def _reload(self, force: bool = False, interval: float = 1.0) -> None:
        now = time.monotonic()
        if not force and now - self._checked < interval:
            return
        self._checked = now
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._state, self._stamp = _State(), None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            raw = json.loads(self.path.read_text())
            self._state = _State(
                {t["id"]: TokenRecord(t["id"], t["name"], frozenset(t["scopes"]), t["sha256"], t["created"],
                                      t.get("expires"), t.get("revoked")) for t in raw.get("tokens", [])},
                {s["subject"]: frozenset(s["scopes"]) for s in raw.get("subjects", [])},
            )
            self._stamp = stamp
        except (OSError, ValueError, KeyError, TypeError) as error:
            # Keep serving with what was last read: a half-edited file must not lock everyone out.
            log.error("cannot read %s (%s); keeping the credentials read before", self.path, error)

    def _snapshot(self, interval: float = 1.0) -> _State:
        with self._lock:
            self._reload(interval=interval)
            return self._state

    def authenticate_token(self, token: str) -> Principal | None:
        match = _TOKEN_RE.match(token)
        if match is None:
            return None
        record = self._snapshot().tokens.get(match.group(1))
        if record is None:  # perhaps created a moment ago: look again (costs a stat when nothing changed)
            record = self._snapshot(interval=0.0).tokens.get(match.group(1))
        if record is None or not hmac.compare_digest(record.sha256, _hash(token)):
            return None
        if not record.active(datetime.now(timezone.utc)):
            return None
        return Principal(record.name, "token", record.scopes)

    def certificate_principal(self, subject: str) -> Principal:
        scopes = self._snapshot().subjects.get(subject, DEVICE_SCOPES)
        return Principal(subject, "certificate", scopes)

    def tokens(self) -> list[TokenRecord]:
        return sorted(self._snapshot().tokens.values(), key=lambda t: t.created)

    def grants(self) -> dict[str, frozenset[str]]:
        return dict(self._snapshot().subjects)

    # -- writing (CLI) -----------------------------------------------------------------------
    def create_token(self, name: str, scopes: Iterable[str], days: float | None = None) -> tuple[TokenRecord, str]:
        """A new token; the secret is returned once and never stored."""
        chosen = check_scopes(scopes)
        _check_name(name, "token name")
        token_id = secrets.token_hex(6)
        secret = f"{TOKEN_PREFIX}_{token_id}_{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"
        now = datetime.now(timezone.utc)
        expires = None if days is None else datetime.fromtimestamp(now.timestamp() + days * 86400, timezone.utc).isoformat()
        record = TokenRecord(token_id, name, chosen, _hash(secret), now.isoformat(), expires)
        with self._lock:
            self._reload(force=True)
            self._state.tokens[token_id] = record
            self._write()
        return record, secret

    def revoke(self, token_id_or_name: str) -> list[TokenRecord]:
        """Revoke the token with this id, or every active token with this name."""
        with self._lock:
            self._reload(force=True)
            now = datetime.now(timezone.utc)
            hits = [t for t in self._state.tokens.values()
                    if (t.token_id == token_id_or_name or t.name == token_id_or_name) and t.revoked is None]
            for t in hits:
                self._state.tokens[t.token_id] = TokenRecord(t.token_id, t.name, t.scopes, t.sha256, t.created,
                                                             t.expires, now.isoformat())
            if hits:
                self._write()
        return hits

    def grant(self, subject: str, scopes: Iterable[str]) -> None:
        """Scopes of a client certificate's common name (without a grant: `recognize`)."""
        chosen = check_scopes(scopes)
        _check_name(subject, "certificate subject")
        with self._lock:
            self._reload(force=True)
            self._state.subjects[subject] = chosen
            self._write()

    def _write(self) -> None:
        data = {
            "version": 1,
            "tokens": [{"id": t.token_id, "name": t.name, "scopes": sorted(t.scopes), "sha256": t.sha256,
                        "created": t.created, "expires": t.expires, "revoked": t.revoked}
                       for t in self._state.tokens.values()],
            "subjects": [{"subject": s, "scopes": sorted(v)} for s, v in sorted(self._state.subjects.items())],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self._stamp = None


class RateLimiter:
    """A token bucket per principal: `rate` events a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0) -> float:
        """0 if allowed (and counted), else the seconds to wait before this would be allowed."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level >= cost:
                self._buckets[key] = (level - cost, now)
                return 0.0
            self._buckets[key] = (level, now)
            return (cost - level) / self.rate


def rate_limited(wait_s: float, what: str) -> ResourceExhausted:
    return ResourceExhausted(f"rate limit: too many {what} for this principal; retry after {wait_s:.2f} s",
                             retry_after_s=wait_s)


def _metadata(details_or_context: Any) -> dict[str, str]:
    items = details_or_context.invocation_metadata() or ()
    return {key: value for key, value in items if isinstance(value, str)}


class Authenticator:
    """Names the principal of a call from its metadata and TLS session."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        header = _metadata(context).get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <token>'")
            principal = self.store.authenticate_token(token.strip())
            if principal is None:
                raise Unauthenticated("the bearer token is unknown, revoked or expired")
            return principal
        # gRPC verified the certificate against --client-ca before the call reached us.
        names = context.auth_context().get("x509_common_name") or []
        if names:
            return self.store.certificate_principal(names[0].decode(errors="replace"))
        raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' metadata or a client certificate")


Handler = Callable[..., Awaitable[Any]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The one place where every call is authenticated, authorised, rate-limited and where any
    failure becomes a typed status. Servicers read the caller from `current_principal`."""

    def __init__(
        self, authenticator: Authenticator, calls: RateLimiter, on_denied: Callable[[str, str, str, str], None] | None = None
    ) -> None:
        self.authenticator = authenticator
        self.calls = calls
        self.on_denied = on_denied  # (principal or "-", method, peer, reason) -> None: the audit log of refusals

    async def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201 - grpc's signature
        handler = await continuation(details)
        method = details.method
        if handler is None:
            return handler
        if method.startswith(HEALTH_SERVICE):  # open to all, but parsed here too (else UNKNOWN with the parser's text)
            return _wrap(handler, method, _open_to_all)
        scope = "admin" if method.startswith(REFLECTION_SERVICES) else METHOD_SCOPES.get(method)
        return _wrap(handler, method, self._guard(method, scope))

    def _guard(self, method: str, scope: str | None) -> Callable[[grpc.aio.ServicerContext], Principal]:
        def check(context: grpc.aio.ServicerContext) -> Principal:
            principal: Principal | None = None
            try:
                principal = self.authenticator.principal(context)
                if scope is None:
                    raise PermissionDenied(f"{method} is not open to any scope")
                if not principal.has(scope):
                    raise PermissionDenied(f"{principal} lacks the scope '{scope}' that {method} needs")
                if not method.endswith("/Recognize"):  # faces on a stream are limited per face
                    wait = self.calls.take(str(principal))
                    if wait > 0:
                        raise rate_limited(wait, "calls")
            except ServiceError as error:
                if self.on_denied is not None and not isinstance(error, ResourceExhausted):
                    self.on_denied(str(principal) if principal else "-", method, context.peer(), error.message)
                raise
            current_principal.set(principal)
            return principal

        return check


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    if error.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(error.retry_after_s * 1000) + 1)),))
    await context.abort(error.code, error.message)


def _internal(method: str) -> ServiceError:
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error in %s (incident %s)", method, incident)
    return ServiceError(f"internal error (incident {incident}); the server log has the details")


def _open_to_all(context: grpc.aio.ServicerContext) -> None:
    """The check of a health call: none (a load balancer holds no credential)."""


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, check: Callable[[grpc.aio.ServicerContext], Principal | None]
) -> grpc.RpcMethodHandler:
    """The same handler with `check` run first and every exception turned into a status.

    Streaming responses are written with context.write() whether the inner handler is an
    async generator (reflection) or a read/write coroutine (Recognize), so one coroutine
    wraps every kind.
    """
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    inner = getattr(handler, kind)
    streaming_response = kind.endswith("_stream")
    # Requests are parsed here rather than by grpc, which answers a message that does not parse
    # with UNKNOWN and the parser's exception text before any handler or interceptor sees it.
    parse = handler.request_deserializer
    raw_unary = kind.startswith("unary") and parse is not None
    raw_stream = method in READ_BY_SERVICER and parse is not None

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check(context)
            if raw_unary:
                request = parse_request(parse, request, method)
            result = inner(request, _ParsingContext(context, parse, method) if raw_stream else context)
            if not streaming_response:
                return await result
            if inspect.isawaitable(result):
                return await result
            async for response in _as_async(result):
                await context.write(response)
            return None
        except ServiceError as error:
            await abort(context, error)
        except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
            raise
        except Exception:  # a bug: logged with an incident id, never its text to the client
            await abort(context, _internal(method))

    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    deserializer = None if raw_unary or raw_stream else parse
    return factory(guarded, deserializer, handler.response_serializer)


#: Streaming methods whose servicer reads with context.read() and answers a message that does not
#: parse on the stream itself (one REJECTED result) instead of ending the stream.
READ_BY_SERVICER = frozenset({"/facelink.v1.Recognition/Recognize"})


class UnreadableMessage(InvalidArgument):
    """A stream message that is not the method's request type."""


def parse_request(parse: Callable[[bytes], Any], data: bytes, method: str) -> Any:
    try:
        return parse(data)
    except Exception:  # noqa: BLE001 - DecodeError, or whatever a parser raises on garbage
        kind = getattr(getattr(parse, "__self__", None), "__name__", "request")
        raise UnreadableMessage(f"a {method.rsplit('/', 1)[-1]} message of {len(data)} bytes does not parse "
                                f"as a {kind}") from None


class _ParsingContext:
    """The servicer context, with read() parsing each raw message (UnreadableMessage if it does not)."""

    def __init__(self, context: grpc.aio.ServicerContext, parse: Callable[[bytes], Any], method: str) -> None:
        self._context = context
        self._parse = parse
        self._method = method

    async def read(self) -> Any:
        data = await self._context.read()
        return data if data is grpc.aio.EOF else parse_request(self._parse, data, self._method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _as_async(responses: Any):  # noqa: ANN201
    """Stream handlers may be async generators or plain iterators (grpc allows both)."""
    if hasattr(responses, "__aiter__"):
        async for item in responses:
            yield item
    else:
        for item in responses:
            yield item
