"""CSAHE ring relay, server side: one secure aggregation over abstract ``send`` calls, with re-runs on failure.

Pure code (tenseal and numpy via :mod:`fedseg.algorithms.csahe`, no nvflare import). The FLARE controller
(:mod:`fedseg.flare.ring_controller`) wires ``send`` to FLARE tasks; the unit tests wire it to in-memory sites.

One aggregation (:func:`secure_aggregate`)
------------------------------------------
``send(site, kind, payload) -> reply`` asks one site to do one step and returns its reply (a dict):

=========  ============================================================  ===========================================
kind       payload (server -> site)                                      reply (site -> server)
=========  ============================================================  ===========================================
"start"    attempt, weight w_I, ring_size                                public_context (bytes), messages (list of
                                                                         bytes): Enc(w_I * Delta_I + R)
"prepare"  attempt, weight w_j, ring_size, public_context                round_tag (16 bytes: sha256 of the public
                                                                         context the member encrypted under); the
                                                                         ciphertexts of Enc(w_j * Delta_j) stay at
                                                                         the site
"hop"      attempt, weight w_j, ring_size, public_context, messages      messages: Enc(running sum + w_j * Delta_j);
                                                                         prepared: whether the member added its
                                                                         prepared ciphertexts (else it encrypted in
                                                                         the hop)
"finish"   attempt, messages (the full ring sum)                         aggregate: name -> array, sum_k w_k Delta_k
=========  ============================================================  ===========================================

An attempt: ``ring_order`` (``secrets.SystemRandom``) shuffles the sites, the first is the initiator I; weights
``w_k = n_k / sum n`` over the sites of THIS attempt (``n_k`` = local steps for FedGS / FedAvg, training samples for
Per-FedAvg: the caller passes ``counts``); "start" at I, "hop" at every other site in ring order, "finish" at I.

Pre-encryption (``prepare=True``, the default). Re-encrypting a member's whole update inside its hop put K - 1
encryptions of the full update on the sequential ring (0.58 of a 0.65 s hop at the quick job's size). Instead, right
after the initiator's "start" reply is checked, ONE parallel wave of requests goes out (``send_many``: each a
separate task, all outstanding at once): the first member's "hop" (it encrypts in its hop: nothing could have been
prepared before the public context existed) and a "prepare" for every later member, carrying the round's public
context and that member's own weight. Each later member encrypts its weighted update under that context
(``csahe.member_prepare``) and keeps the ciphertexts at the site, bound to the round tag, layout and weight; its
hop then only deserializes the running sum, adds them and serializes. The server sees the same kinds of objects as
without the prepare step (public contexts it relays, ciphertext messages, and now each member's echo of the round
tag it prepared under, a hash of that public context): a member's own ciphertexts never leave it on their own.

Rules: a prepared ciphertext is used by one hop at most and only under the context it was made for (another round
tag, weight or layout: the member encrypts in the hop instead, :class:`RingMember`; ``csahe.member_hop`` itself
refuses to mix). A new attempt (always a fresh initiator context) re-prepares; the member discards what it
prepared for an older attempt at its next request. A member whose preparation is missing (e.g. the site restarted)
encrypts in its hop. **A prepare that fails (error, no reply within the timeout, an echo of another round tag) counts
like a hop failure: the site is dropped and the attempt re-run without it (every site that failed the wave is dropped
at once).** Rationale: a site that cannot encrypt its update under the round's context within the hop timeout
cannot do its hop either (a fallback hop does the same encryption); dropping it before any hop saves the other
sites' hop work and the hop timeout the ring would otherwise wait out later; nothing of the attempt is kept.

Every reply is checked by the server itself before anything is relayed, under the round's PUBLIC context only:
the public context deserializes and holds no secret key (``csahe.validate_public_context``), and every ciphertext
reply has the CSAHE header, this round's tag, the round's layout digest, the expected count, and deserializes with
4096 slots (``csahe.validate_messages``). A failure is therefore pinned on the site that returned the bad reply (or
did not reply: ``send`` raised, returned ``None`` or a :class:`SendFailed` marker; a timeout is ``send``'s business).
The finished aggregate goes through ``check_result`` (the controller checks finiteness, keys and shapes).

On any failure every partial sum of the attempt is discarded (nothing of it is returned), the failed site is dropped
and a new attempt starts with a fresh ring order, hence usually a fresh initiator, and always fresh keys and mask (a
"start" builds a new ``csahe.Initiator``) while at least ``min_sites`` (>= 3) sites remain; otherwise the aggregation
gives up with a reason. One exception: when the initiator's *finished aggregate* reached the server and was rejected
(``check_result``: NaN, wrong keys or shapes), the round is skipped without a re-run. The server then already holds
an aggregate over all sites of the attempt (its valid entries); an aggregate over the same sites minus the initiator
would hand it, by subtraction, the initiator's own weighted update. (A finish that fails without returning an aggregate,
e.g. a timeout or a decryption error at the initiator, is re-run as usual.) The outcome's ``aggregate`` is either the complete ring sum of a successful attempt or
``None``: a partial sum is never returned.

Everything the server sends and receives is recorded as a :class:`Transfer` (attempt, kind, direction, site, item,
size, sha256, and the bytes themselves when ``keep_bytes``), so tests can inspect what the server saw.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from fedseg.algorithms.csahe import (
    MIN_SITES,
    CSAHEError,
    message_header,
    ring_order,
    round_tag,
    sample_weights,
    validate_messages,
    validate_public_context,
)
from fedseg.errors import ConfigError, FedsegError

__all__ = [
    "KINDS",
    "TASK_NAMES",
    "Attempt",
    "RingAborted",
    "RingMember",
    "RingOutcome",
    "SendFailed",
    "Transfer",
    "ring_weights",
    "secure_aggregate",
]

KINDS = ("start", "prepare", "hop", "finish")
TASK_NAMES = {"start": "csahe_start", "prepare": "csahe_prepare", "hop": "csahe_hop",
              "finish": "csahe_finish"}  # the FLARE task of each kind


@dataclass(frozen=True)
class SendFailed:
    """What ``send`` may return instead of a reply when the site failed or timed out (same as raising)."""

    reason: str


class RingAborted(Exception):
    """Raised by ``send`` when the whole run is being aborted: the aggregation stops, no site is blamed."""


class _SiteFailure(Exception):
    def __init__(self, site: str, stage: str, reason: str, aggregate_seen: bool = False,
                 more: Sequence[_SiteFailure] = ()):
        super().__init__(reason)
        self.site, self.stage, self.reason, self.aggregate_seen = site, stage, reason, aggregate_seen
        self.more = list(more)  # further sites that failed in the same parallel wave

    @property
    def all(self) -> list[_SiteFailure]:
        return [self, *self.more]


@dataclass(frozen=True)
class Transfer:
    """One object that crossed the server: ``direction`` "sent" (server -> site) or "received" (site -> server)."""

    attempt: int
    kind: str  # "start" | "prepare" | "hop" | "finish"
    direction: str  # "sent" | "received"
    site: str
    item: str  # "public_context" | "ciphertext" | "aggregate" | "round_tag" (a member's prepare echo)
    nbytes: int
    sha256: str
    is_private: bool | None = None  # for public contexts: ts.context_from(bytes).is_private()
    data: bytes | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data")
        return d


@dataclass
class Attempt:
    """One try of the ring: its order (initiator first), weights, and how it ended."""

    index: int
    order: list[str]
    weights: dict[str, float]
    ok: bool = False
    failed_site: str | None = None
    stage: str | None = None  # where it failed: "start" | "prepare" | "hop" | "finish"
    reason: str | None = None
    seconds: float = 0.0
    bytes_relayed: int = 0  # public contexts + ciphertexts (+ 16-byte prepare echoes), both directions
    failed_sites: list[str] = field(default_factory=list)  # all sites dropped after it (a parallel wave may fail >1)
    prepared: list[str] = field(default_factory=list)  # members whose prepare was acknowledged under this context
    in_hop: list[str] = field(default_factory=list)  # members whose hop reported encrypting in the hop
    wave_seconds: float = 0.0  # the parallel wave: first member's hop + the others' prepare (0 without prepare)

    @property
    def initiator(self) -> str:
        return self.order[0]


@dataclass
class RingOutcome:
    """Result of :func:`secure_aggregate`: ``aggregate`` is the full ring sum or None (then ``reason`` says why)."""

    aggregate: dict[str, np.ndarray] | None
    reason: str | None
    attempts: list[Attempt]
    transfers: list[Transfer]
    dropped: dict[str, str]  # site -> why it was left out of later attempts
    seconds: float
    n_values: int | None = None  # values per site in the packed vector (the layout's size), when known

    @property
    def ok(self) -> bool:
        return self.aggregate is not None

    @property
    def sites(self) -> list[str]:
        """The sites whose updates are in ``aggregate`` (the successful attempt's ring)."""
        return list(self.attempts[-1].order) if self.ok else []

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.attempts[-1].weights) if self.ok else {}

    @property
    def bytes_relayed(self) -> int:
        return sum(a.bytes_relayed for a in self.attempts)

    @property
    def private_context_received(self) -> bool:
        """True when any public context the server received was private (held a secret key)."""
        return any(t.is_private for t in self.transfers if t.item == "public_context")

    def summary(self) -> dict[str, Any]:
        """JSON-able record (no bytes): attempts, dropped sites, bytes, seconds, every transfer's kind/size/sha256."""
        contexts = [t for t in self.transfers if t.item == "public_context" and t.direction == "received"]
        return {
            "ok": self.ok,
            "reason": self.reason,
            "sites": self.sites,
            "weights": self.weights,
            "attempts": [asdict(a) for a in self.attempts],
            "dropped": dict(self.dropped),
            "bytes_relayed": self.bytes_relayed,
            "seconds": round(self.seconds, 4),
            "n_values": self.n_values,
            "public_contexts_received": len(contexts),
            "private_context_received": self.private_context_received,
            "transfers": [t.record() for t in self.transfers],
        }


def ring_weights(counts: Mapping[str, float], sites: Sequence[str]) -> dict[str, float]:
    """w_k = n_k / sum n over ``sites`` only (re-normalised when a site was dropped)."""
    return sample_weights({s: counts[s] for s in sites})


# ---------------------------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, transfers: list[Transfer], keep_bytes: bool):
        self.transfers = transfers
        self.keep_bytes = keep_bytes
        self.bytes = 0

    def add(self, attempt: int, kind: str, direction: str, site: str, item: str, data: bytes,
            is_private: bool | None = None) -> None:
        self.transfers.append(Transfer(
            attempt, kind, direction, site, item, len(data), hashlib.sha256(data).hexdigest(), is_private,
            data if self.keep_bytes else None,
        ))
        if item != "aggregate":  # public contexts, ciphertexts and the 16-byte prepare echoes
            self.bytes += len(data)

    def messages(self, attempt: int, kind: str, direction: str, site: str, messages: Sequence[bytes]) -> None:
        for m in messages:
            self.add(attempt, kind, direction, site, "ciphertext", bytes(m))


def _is_private(public_context: bytes) -> bool | None:
    try:
        return bool(ts.context_from(bytes(public_context)).is_private())
    except (ValueError, RuntimeError, TypeError):
        return None  # garbage: validate_public_context reports it


def _call(send: Callable, site: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = send(site, kind, payload)
    except RingAborted:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure of the call (timeout, dead site, error) is the site's
        raise _SiteFailure(site, kind, f"{type(exc).__name__}: {exc}") from None
    return _check_reply(site, kind, reply)


def _check_reply(site: str, kind: str, reply: Any) -> dict[str, Any]:
    if isinstance(reply, RingAborted):
        raise reply
    if isinstance(reply, BaseException):
        raise _SiteFailure(site, kind, f"{type(reply).__name__}: {reply}")
    if reply is None:
        raise _SiteFailure(site, kind, "no reply (timeout or no result)")
    if isinstance(reply, SendFailed):
        raise _SiteFailure(site, kind, reply.reason)
    if not isinstance(reply, Mapping):
        raise _SiteFailure(site, kind, f"the reply is a {type(reply).__name__}, not a mapping")
    return dict(reply)


def _with_extra(send: Callable, extra: Mapping[str, Any] | None) -> Callable:
    if not extra:
        return send
    return lambda site, kind, payload: send(site, kind, {**dict(extra), **payload})


def _many_with_extra(send_many: Callable, extra: Mapping[str, Any] | None) -> Callable:
    if not extra:
        return send_many
    return lambda calls: send_many([(site, kind, {**dict(extra), **payload}) for site, kind, payload in calls])


def sequential_send_many(send: Callable) -> Callable:
    """``send_many`` made of ``send`` calls one after the other (in-memory sites; a real transport sends the calls
    at once). Returns one entry per call: the reply, or the exception the call raised (``RingAborted`` propagates)."""

    def send_many(calls):
        out = []
        for site, kind, payload in calls:
            try:
                out.append(send(site, kind, payload))
            except RingAborted:
                raise
            except Exception as exc:  # noqa: BLE001 -- the site's failure, judged by the driver
                out.append(exc)
        return out

    return send_many


def _messages_of(reply: Mapping[str, Any], site: str, kind: str) -> list[bytes]:
    messages = reply.get("messages")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, (bytes, bytearray)) for m in messages):
        raise _SiteFailure(site, kind, "the reply holds no list of ciphertext messages (bytes)")
    return [bytes(m) for m in messages]


def _run_attempt(index: int, order: list[str], weights: dict[str, float], send: Callable, rec: _Recorder,
                 expected_count: int | None, layout_digest: bytes | None,
                 check_result: Callable[[dict[str, np.ndarray], str], None] | None,
                 send_many: Callable | None = None, attempt: Attempt | None = None) -> dict[str, np.ndarray]:
    initiator = order[0]
    ring_size = len(order)

    # start: the initiator's public context and Enc(w_I * Delta_I + R)
    reply = _call(send, initiator, "start", {"attempt": index, "weight": weights[initiator], "ring_size": ring_size})
    public = reply.get("public_context")
    if not isinstance(public, (bytes, bytearray)):
        raise _SiteFailure(initiator, "start", "the reply holds no public context (bytes)")
    public = bytes(public)
    rec.add(index, "start", "received", initiator, "public_context", public, _is_private(public))
    messages = _messages_of(reply, initiator, "start")
    rec.messages(index, "start", "received", initiator, messages)
    try:
        context = validate_public_context(public, initiator)
        tag = round_tag(public)
        if expected_count is None:
            if not messages:
                raise CSAHEError(f"CSAHE: site {initiator} started the ring with no ciphertext")
            expected_count = message_header(messages[0])[3]
        layout = validate_messages(context, messages, expected_count, layout_digest, round_tag=tag, site=initiator,
                                   hop="start (initiator's reply)")
    except CSAHEError as exc:
        raise _SiteFailure(initiator, "start", str(exc)) from None

    def hop_payload(site):
        return {"attempt": index, "weight": weights[site], "ring_size": ring_size, "public_context": public,
                "messages": messages}

    def hop_reply(site, sender, reply):
        out = _messages_of(reply, site, "hop")
        rec.messages(index, "hop", "received", site, out)
        try:
            validate_messages(context, out, expected_count, layout, round_tag=tag, site=site,
                              hop=f"hop {sender} -> {site} (its reply)")
        except CSAHEError as exc:
            raise _SiteFailure(site, "hop", str(exc)) from None
        if attempt is not None and reply.get("prepared") is False:
            attempt.in_hop.append(site)
        return out

    members = order[1:]
    if send_many is not None:
        # one parallel wave: the first member's hop (it encrypts in its hop) + a prepare for every later member
        first, later = members[0], members[1:]
        calls = [(first, "hop", hop_payload(first))]
        rec.add(index, "hop", "sent", first, "public_context", public)
        rec.messages(index, "hop", "sent", first, messages)
        for site in later:
            calls.append((site, "prepare", {"attempt": index, "weight": weights[site], "ring_size": ring_size,
                                            "public_context": public}))
            rec.add(index, "prepare", "sent", site, "public_context", public)
        t_wave = time.perf_counter()
        replies = send_many(calls)
        if attempt is not None:
            attempt.wave_seconds = time.perf_counter() - t_wave
        if not isinstance(replies, (list, tuple)) or len(replies) != len(calls):
            raise ConfigError(f"CSAHE: send_many returned {type(replies).__name__} for {len(calls)} calls; it must "
                              "return one reply (or exception) per call")
        failures: list[_SiteFailure] = []
        first_messages = None
        for (site, kind, _), raw in zip(calls, replies):
            try:
                reply = _check_reply(site, kind, raw)
                if kind == "hop":
                    first_messages = hop_reply(site, initiator, reply)
                    continue
                echo = reply.get("round_tag")
                if isinstance(echo, (bytes, bytearray)):
                    rec.add(index, "prepare", "received", site, "round_tag", bytes(echo))
                if echo != tag:
                    raise _SiteFailure(site, "prepare", "the prepare reply does not echo this round's tag ("
                                       + (f"{bytes(echo).hex()[:12]}" if isinstance(echo, (bytes, bytearray))
                                          else f"got {type(echo).__name__}")
                                       + f" != {tag.hex()[:12]}): it did not encrypt under this round's context")
                if attempt is not None:
                    attempt.prepared.append(site)
            except _SiteFailure as f:
                failures.append(f)
        if failures:
            raise _SiteFailure(failures[0].site, failures[0].stage, failures[0].reason, more=failures[1:])
        messages = first_messages
        sender, rest = first, later
    else:
        sender, rest = initiator, members

    # hops: each member adds its weighted update to the running sum
    for site in rest:
        rec.add(index, "hop", "sent", site, "public_context", public)
        rec.messages(index, "hop", "sent", site, messages)
        reply = _call(send, site, "hop", hop_payload(site))
        messages = hop_reply(site, sender, reply)
        sender = site

    # finish: the initiator decrypts, removes R, returns the weighted sum
    rec.messages(index, "finish", "sent", initiator, messages)
    reply = _call(send, initiator, "finish", {"attempt": index, "messages": messages})
    aggregate = reply.get("aggregate")
    if not isinstance(aggregate, Mapping) or not aggregate:
        raise _SiteFailure(initiator, "finish", "the reply holds no aggregate (name -> array)",
                           aggregate_seen=aggregate is not None)
    aggregate = {str(k): np.asarray(v) for k, v in aggregate.items()}
    for value in aggregate.values():
        rec.add(index, "finish", "received", initiator, "aggregate", value.tobytes())
    if check_result is not None:
        try:
            check_result(aggregate, initiator)
        except FedsegError as exc:
            raise _SiteFailure(initiator, "finish", f"the aggregate was rejected: {exc}", aggregate_seen=True) from None
    return aggregate


def secure_aggregate(
    participants: Sequence[str],
    counts: Mapping[str, float],
    send: Callable[[str, str, dict[str, Any]], Any],
    *,
    rng: secrets.SystemRandom | None = None,
    log: Callable[[str], None] | None = None,
    min_sites: int = MIN_SITES,
    expected_count: int | None = None,
    layout_digest: bytes | None = None,
    n_values: int | None = None,
    check_result: Callable[[dict[str, np.ndarray], str], None] | None = None,
    keep_bytes: bool = False,
    label: str = "CSAHE",
    extra: Mapping[str, Any] | None = None,
    prepare: bool = True,
    send_many: Callable[[list[tuple[str, str, dict[str, Any]]]], list[Any]] | None = None,
) -> RingOutcome:
    """Run one CSAHE secure aggregation over ``participants`` (see the module docstring).

    ``prepare`` (default True): the parallel wave after "start" (first member's hop + every later member's
    prepare), see the module docstring; ``send_many(calls) -> replies`` sends ``[(site, kind, payload), ...]`` at
    once and returns one reply or exception per call (default: ``sequential_send_many(send)``). ``prepare=False``:
    every member encrypts in its hop (the protocol before pre-encryption).

    ``counts[site]`` = n_k (steps or samples); ``expected_count`` / ``layout_digest``: the number of ciphertexts and
    the layout every message must carry (from the global model; None = the initiator's first message decides);
    ``check_result(aggregate, initiator)`` raises a ``FedsegError`` to reject the finished aggregate; ``log`` gets one
    line per failure and one per success; ``extra`` (e.g. ``{"round": 3}``) is added to every payload. Returns a :class:`RingOutcome`; never raises for a site's failure.
    """
    log = log or (lambda _msg: None)
    if int(min_sites) < MIN_SITES:
        raise ConfigError(f"CSAHE: min_sites must be >= {MIN_SITES} (with 2 sites the initiator learns the other's "
                          f"update), got {min_sites}")
    participants = list(participants)
    if len(set(participants)) != len(participants):
        raise ConfigError(f"CSAHE: duplicate site names among the participants {participants}")
    missing = [s for s in participants if s not in counts]
    if missing:
        raise ConfigError(f"CSAHE: no count (steps / samples) for sites {missing}")
    for site in participants:
        c = counts[site]
        if not isinstance(c, (int, float, np.integer, np.floating)) or not math.isfinite(float(c)) or c <= 0:
            raise ConfigError(f"CSAHE: site {site}'s count {c!r} must be a finite number > 0")
    rng = rng if rng is not None else secrets.SystemRandom()
    transfers: list[Transfer] = []
    attempts: list[Attempt] = []
    dropped: dict[str, str] = {}
    remaining = list(participants)
    t_all = time.perf_counter()

    def outcome(aggregate, reason):
        return RingOutcome(aggregate, reason, attempts, transfers, dropped, time.perf_counter() - t_all, n_values)

    while True:
        if len(remaining) < min_sites:
            why = (f"only {len(remaining)} site(s) {sorted(remaining)} left"
                   + (f" after dropping {sorted(dropped)}" if dropped else "")
                   + f", fewer than {min_sites}: no secure aggregation this round (with fewer sites a site could "
                   "learn another's update); the global model is kept")
            log(f"{label}: {why}")
            return outcome(None, why)
        order = ring_order(remaining, rng)
        attempt = Attempt(len(attempts) + 1, order, ring_weights(counts, order))
        attempts.append(attempt)
        rec = _Recorder(transfers, keep_bytes)
        t0 = time.perf_counter()
        try:
            many = (_many_with_extra(send_many or sequential_send_many(send), extra) if prepare else None)
            aggregate = _run_attempt(attempt.index, order, attempt.weights, _with_extra(send, extra), rec,
                                     expected_count, layout_digest, check_result, send_many=many, attempt=attempt)
        except RingAborted as exc:
            attempt.seconds, attempt.bytes_relayed = time.perf_counter() - t0, rec.bytes
            attempt.stage, attempt.reason = "aborted", str(exc) or "aborted"
            log(f"{label}: attempt {attempt.index} aborted ({attempt.reason}); every partial sum is discarded")
            return outcome(None, f"aborted: {attempt.reason}")
        except _SiteFailure as f:
            attempt.seconds, attempt.bytes_relayed = time.perf_counter() - t0, rec.bytes
            attempt.failed_site, attempt.stage, attempt.reason = f.site, f.stage, f.reason
            attempt.failed_sites = [g.site for g in f.all]
            if f.more:
                attempt.reason = "; ".join(f"{g.site} ({g.stage}): {g.reason}" for g in f.all)
            for g in f.all:
                dropped[g.site] = f"{g.stage}: {g.reason}"
            remaining = [s for s in remaining if s not in attempt.failed_sites]
            if f.aggregate_seen:
                why = (f"the initiator {f.site} returned an aggregate that was rejected; a re-run without it would "
                       "give the server two aggregates whose difference is that site's own update, so the round is "
                       "skipped; the global model is kept")
                log(f"{label}: attempt {attempt.index} failed at site {f.site} ({f.stage}): {f.reason}; {why}")
                return outcome(None, why)
            next_step = (f"re-running with the {len(remaining)} other sites (fresh initiator, keys and mask)"
                         if len(remaining) >= min_sites else
                         f"only {len(remaining)} site(s) left (< {min_sites}): the round is skipped")
            where = (f"site {f.site} ({f.stage}): {f.reason}" if not f.more else
                     f"sites {attempt.failed_sites}: {attempt.reason}")
            log(f"{label}: attempt {attempt.index} failed at {where}; every partial sum of this attempt is discarded; "
                f"{next_step}")
            continue
        attempt.ok = True
        attempt.seconds, attempt.bytes_relayed = time.perf_counter() - t0, rec.bytes
        log(f"{label}: attempt {attempt.index} ok: ring {order} (initiator {order[0]}), "
            f"{attempt.bytes_relayed / 1e6:.1f} MB relayed, {attempt.seconds:.2f} s")
        return outcome(aggregate, None)


# ---------------------------------------------------------------------------------------------------------------------
# site side


class RingMember:
    """Site side of the ring: holds this round's update and answers "start" / "prepare" / "hop" / "finish" (pure).

    ``set_update(round_id, update)`` after local training (the update never leaves the site in plaintext);
    ``handle(kind, payload)`` -> reply dict (see the module docstring). A "start" builds a NEW ``csahe.Initiator``
    (fresh keys and mask) for its attempt; only the latest attempt's initiator is kept, and a "finish" for any other
    attempt is refused. Payloads for another round than the stored update's, or with ``ring_size`` < 3, are refused
    with ``CSAHEError``.

    "prepare" encrypts the weighted update under the payload's public context (``csahe.member_prepare``) and keeps
    it (one at a time: a newer prepare replaces it); the reply echoes the round tag. "hop" adds the prepared
    ciphertexts when they were made for this hop's round tag and weight, else it encrypts in the hop (and says so:
    reply ``prepared`` False, ``last_hop_note`` tells why); either way the prepared ciphertexts are discarded by the
    hop, by a "start" (a new attempt), by ``set_update`` and by ``clear``.
    """

    def __init__(self, site: str, sigma: float = 1e4):
        from fedseg.algorithms.csahe import _check_sigma

        self.site = site
        self.sigma = _check_sigma(sigma)
        self._round: Any = None
        self._update: dict[str, np.ndarray] | None = None
        self._initiator = None
        self._initiator_key: Any = None
        self._prepared = None  # csahe.Prepared of the latest "prepare"
        self.last_hop_note: str | None = None

    @property
    def round(self) -> Any:
        return self._round

    @property
    def prepared(self):
        """The kept ``csahe.Prepared`` (None when nothing is prepared)."""
        return self._prepared

    def _discard_prepared(self) -> None:
        if self._prepared is not None:
            self._prepared.discard()
        self._prepared = None

    def set_update(self, round_id: Any, update: Mapping[str, np.ndarray]) -> str:
        """Keep ``update`` for ``round_id``; returns its layout digest (hex) for the train metadata.

        ``UpdateRejected`` when the update is not finite or too large for the ring (the site then reports it instead
        of joining)."""
        from fedseg.algorithms.csahe import PackSpec, _checked_vector

        spec = PackSpec.from_update(update)
        _checked_vector(spec, update, 1.0, self.site)  # finite and within CKKS headroom, or UpdateRejected now
        self._round, self._update = round_id, {k: np.asarray(v) for k, v in update.items()}
        self._initiator, self._initiator_key = None, None
        self._discard_prepared()
        return spec.digest().hex()

    def clear(self) -> None:
        self._round, self._update, self._initiator, self._initiator_key = None, None, None, None
        self._discard_prepared()

    def _check(self, kind: str, payload: Mapping[str, Any]) -> None:
        if kind not in KINDS:
            raise CSAHEError(f"CSAHE: site {self.site} got an unknown ring request {kind!r}")
        if self._update is None:
            raise CSAHEError(f"CSAHE: site {self.site} holds no update (it did not train this round or the run "
                             "restarted); it cannot take part in this ring")
        if "round" in payload and payload["round"] != self._round:
            raise CSAHEError(f"CSAHE: site {self.site} holds the update of round {self._round}, the server asks for "
                             f"round {payload['round']}")
        if kind != "finish":
            ring_size = payload.get("ring_size")
            if not isinstance(ring_size, (int, np.integer)) or ring_size < MIN_SITES:
                raise CSAHEError(f"CSAHE: site {self.site} refuses a ring of {ring_size!r} sites (needs >= {MIN_SITES})")

    def handle(self, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        from fedseg.algorithms.csahe import Initiator, PackSpec, member_hop, member_prepare

        self._check(kind, payload)
        key = (payload.get("round"), payload.get("attempt"))
        if kind == "start":
            self._discard_prepared()  # a new attempt: whatever was prepared belongs to an older context
            self._initiator = Initiator(self.site, self._update, float(payload["weight"]), sigma=self.sigma)
            self._initiator_key = key
            return {"public_context": self._initiator.public_context_bytes(), "messages": self._initiator.start()}
        if kind == "prepare":
            self._discard_prepared()
            self._prepared = member_prepare(self.site, payload["public_context"], self._update,
                                            float(payload["weight"]))
            return {"round_tag": self._prepared.round_tag}
        if kind == "hop":
            prepared, self._prepared = self._prepared, None  # used or discarded by this hop, never kept
            weight, public = float(payload["weight"]), payload["public_context"]
            usable = None
            if prepared is None:
                self.last_hop_note = "nothing prepared: encrypted in the hop"
            elif not isinstance(public, (bytes, bytearray)):
                self.last_hop_note = "the hop's public context is no bytes"
            elif prepared.matches(round_tag(bytes(public)), PackSpec.from_update(self._update).digest(), weight):
                usable, self.last_hop_note = prepared, "added the prepared ciphertexts"
            else:
                self.last_hop_note = (f"the prepared ciphertexts are for another round tag / weight ({prepared!r}): "
                                      "discarded, encrypted in the hop")
            if usable is None and prepared is not None:
                prepared.discard()
            try:
                messages = member_hop(self.site, public, payload["messages"], self._update, weight,
                                      hop=f"hop {payload.get('attempt', '?')} at {self.site}", prepared=usable)
            finally:
                if prepared is not None:
                    prepared.discard()
            return {"messages": messages, "prepared": usable is not None}
        if self._initiator is None or key != self._initiator_key:
            raise CSAHEError(f"CSAHE: site {self.site} did not start attempt {key[1]} of round {key[0]}; cannot "
                             "finish it")
        initiator, self._initiator, self._initiator_key = self._initiator, None, None
        return {"aggregate": initiator.finish(payload["messages"])}
