"""CSAHE (cyclic secure aggregation with homomorphic encryption, paper 001): protocol primitives.

Pure code: tenseal and numpy only, no nvflare import. The FLARE ring-relay controller uses these pieces; ``run_ring``
is the in-memory reference of one full round (DESIGN.md section 3).

Round
-----
1. ``ring_order(sites)`` shuffles the participating sites with ``secrets.SystemRandom``; the first is the initiator I.
   Fewer than 3 sites is a ``ConfigError``: with 2 sites the initiator could subtract its own update from the sum.
2. I builds ``Initiator(site, update, weight, sigma)``: a fresh CKKS context (N = 8192, coeff [60, 40], scale 2^40),
   whose secret key never leaves the object. ``public_context_bytes()`` holds only the public key (no secret key, no
   Galois or relinearisation keys: the ring only adds).
3. ``Initiator.start()`` packs the update into one flat float64 vector split into full ciphertexts of 4096 slots,
   draws the mask R ~ N(0, sigma^2) from a CSPRNG-seeded generator (100 <= sigma <= 2^15) and returns the wire
   messages of Enc(w_I * Delta_I + R).
4. Each member calls ``member_hop(site, public_context, messages, update, weight)`` -> messages of
   Enc(running sum + w_j * Delta_j). A message made under another round's context, a wrong count, a layout that differs
   from the initiator's or bytes that are no ciphertext raise ``CSAHEError`` naming the site and the hop.
   Pre-encryption (takes the member's own encryption off the ring's critical path): as soon as the round's public
   context exists, a member may call ``member_prepare(site, public_context, update, weight)`` -> ``Prepared``: its
   weighted update encrypted under that context, kept at the site (never serialized, never sent), bound to the round
   tag, the layout digest and the weight. ``member_hop(..., prepared=p)`` then only deserializes the running sum,
   adds p's ciphertexts and serializes (0.08 instead of 0.58 s CPU at 934,543 values). A ``Prepared`` is used by one hop
   at most (``take`` empties it) and is refused (``CSAHEError``) by a hop of another round tag (another context: a
   re-run always has a fresh initiator and context), of another layout or with another weight: a ciphertext is never
   added under a context it was not made for. Fresh randomness either way: each encryption draws its own.
5. ``Initiator.finish(messages)`` decrypts, subtracts R and unpacks ``sum_k w_k * Delta_k`` (``sample_weights``:
   w_k = n_k / sum n). The mask is discarded after ``finish``: a round can be finished once.

6. The relaying server checks every reply itself, under the round's public context only: ``validate_public_context``
   (deserializes, holds no secret key) and ``validate_messages`` (header magic, round tag, layout digest, index/count,
   each ciphertext deserializes with 4096 slots), so a bad hop is pinned on the site that returned it
   (``fedseg.algorithms.ring`` drives a whole aggregation with re-runs).

Wire message (one per ciphertext): ``b"CSAHE\\x01\\x00\\x00"`` | round tag (16 bytes: sha256 of the public context)
| layout digest (16 bytes: sha256 of the PackSpec) | index (uint32 LE) | count (uint32 LE) | TenSEAL CKKSVector bytes.
Measured: 131,265 bytes per message of 4096 values (48 of them header) = 32.05 bytes per slot; 32.8 bytes per
parameter for 100k parameters (the last ciphertext is padded), plus one 235 kB public context per hop.

Error bound
-----------
Let N = 8192 (N/2 = 4096 real slots), Delta = 2^40, K sites (= K fresh encryptions, K - 1 additions).
SEAL encrypts under the public key at the key level and divides the result by the special prime (2^40), so the
encryption noise of a fresh ciphertext is dominated by that rounding: ``e = r0 + s * r1`` with r0, r1 coefficients
uniform in [-1/2, 1/2] (r0 also takes the encoding rounding of m * Delta) and s the ternary secret (P(+-1) = 2/3).
In slot j (the real part of the canonical embedding at root zeta_j) this gives, per fresh ciphertext,

    std(e_j) = sqrt(N/24) * sqrt(2 + |s(zeta_j)|^2) / Delta,

and |s(zeta_j)| is a fixed (per key) complex-Gaussian-like value with E|s|^2 = 2N/3, so over the N/2 slots
max_j |s(zeta_j)| <= S = sqrt((2N/3) * ln(1e6 * N/2)) = 347 except with probability 1e-6 per key. Noises of the K
independent encryptions add, so their standard deviations add in quadrature (sqrt(K)); given the key each slot's noise
is a sum of many independent bounded terms, and we take z = 7 standard deviations (2.6e-12 per slot):

    noise(K) = z * sqrt(K) * sqrt(N/24) * sqrt(2 + S^2) / Delta  ~=  4.1e-8 * sqrt(K).

Magnitude (the mask's) enters only through double-precision arithmetic: encoding and decoding run an FFT of log2(N)
stages in float64, so each of the K encodings and the one decoding add a relative error of about log2(N) * 2^-53 of
the largest slot value M = 7 sigma + max_abs_value (|R| <= 7 sigma for every slot except with probability 2.6e-12;
max_abs_value bounds |w_k * Delta_k| summed over k, i.e. the largest |Delta_k| since sum w_k = 1):

    float(K, sigma) = 2 * (K + 1) * log2(N) * 2^-53 * M          (~1.7e-14 * M; 1.2e-9 at sigma = 1e4, K = 5)

    error_bound(K, sigma, max_abs_value) = noise(K) + float(K, sigma)     (absolute, per parameter of the sum)

The mask's magnitude also bounds what fits: the single 60-bit data prime leaves 60 - 40 - 1 = 19 bits for values,
|w_I * Delta_I + R + sum_j w_j * Delta_j| < 2^19; we require sigma <= 2^15 (7 sigma < 2^18) and |Delta_k| <= 2^16.
Measured (K = 3, 5; sigma = 1e2 .. 3e4; 10k-100k values): max error 1.2e-8 .. 2.2e-8 (bound 7.1e-8 .. 9.3e-8), noise std 1.24e-9 * sqrt(K), matching
sqrt(N/24) * sqrt(2 + 2N/3) / Delta = 1.24e-9 on average over slots.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from fedseg.errors import ConfigError, FedsegError, UpdateRejected

__all__ = [
    "COEFF_MOD_BIT_SIZES",
    "MAX_ABS_UPDATE",
    "MAX_SIGMA",
    "MIN_SIGMA",
    "MIN_SITES",
    "POLY_MODULUS_DEGREE",
    "SCALE_BITS",
    "SLOTS",
    "CSAHEError",
    "Initiator",
    "PackSpec",
    "Prepared",
    "RelayMessage",
    "RoundKeys",
    "error_bound",
    "member_hop",
    "member_prepare",
    "message_header",
    "message_payload",
    "ring_order",
    "round_tag",
    "run_ring",
    "sample_weights",
    "validate_messages",
    "validate_public_context",
]

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
MIN_SIGMA = 100.0
MAX_SIGMA = float(2**15)
MAX_ABS_UPDATE = float(2**16)
MIN_SITES = 3

_MAGIC = b"CSAHE\x01\x00\x00"
_HEADER = struct.Struct("<8s16s16sII")


class CSAHEError(FedsegError, ValueError):
    """A CSAHE ring message cannot be processed (names the site / hop and the cause)."""


# ---------------------------------------------------------------------------------------------------------------------
# error bound


def error_bound(k_sites: int, sigma: float, max_abs_value: float) -> float:
    """Absolute per-parameter error bound of the ring sum (see the module docstring for the derivation)."""
    if k_sites < 1:
        raise ConfigError(f"error_bound: k_sites must be >= 1, got {k_sites}")
    n = POLY_MODULUS_DEGREE
    delta = 2.0**SCALE_BITS
    s_max = math.sqrt((2.0 * n / 3.0) * math.log(1e6 * n / 2.0))
    z = 7.0
    noise = z * math.sqrt(k_sites) * math.sqrt(n / 24.0) * math.sqrt(2.0 + s_max**2) / delta
    magnitude = 7.0 * float(sigma) + float(max_abs_value)
    fp = 2.0 * (k_sites + 1) * math.log2(n) * 2.0**-53 * magnitude
    return noise + fp


# ---------------------------------------------------------------------------------------------------------------------
# packing


@dataclass(frozen=True)
class PackSpec:
    """Layout of an update (name -> float array) in the flat vector: names in order, shapes, dtypes, offsets."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of packed values."""
        if not self.names:
            return 0
        return self.offsets[-1] + int(np.prod(self.shapes[-1], dtype=np.int64))

    @property
    def n_ciphertexts(self) -> int:
        """Number of full ciphertexts (SLOTS values each) that hold the vector."""
        return max(1, -(-self.size // SLOTS))

    def digest(self) -> bytes:
        """16-byte digest of the layout: every ring message carries it, so a mismatching member is caught."""
        text = repr((self.names, self.shapes, self.dtypes, self.offsets)).encode()
        return hashlib.sha256(text).digest()[:16]

    @classmethod
    def from_update(cls, update: Mapping[str, np.ndarray]) -> PackSpec:
        """Layout of ``update`` in sorted-name order. Only floating-point arrays are accepted."""
        if not update:
            raise UpdateRejected("CSAHE: the update is empty; pass the float parameters (name -> array) to aggregate")
        names, shapes, dtypes, offsets = [], [], [], []
        offset = 0
        for name in sorted(update):
            arr = np.asarray(update[name])
            if not np.issubdtype(arr.dtype, np.floating):
                raise UpdateRejected(
                    f"CSAHE: update entry '{name}' has dtype {arr.dtype}; only float arrays are aggregated "
                    "(leave integer buffers out of the update)"
                )
            names.append(name)
            shapes.append(tuple(int(d) for d in arr.shape))
            dtypes.append(arr.dtype.str)
            offsets.append(offset)
            offset += int(arr.size)
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets))

    def pack(self, update: Mapping[str, np.ndarray], site: str = "?") -> np.ndarray:
        """Flat float64 vector of ``update``, zero-padded to ``n_ciphertexts * SLOTS``; checks keys, shapes, dtypes."""
        if set(update) != set(self.names):
            missing = sorted(set(self.names) - set(update))
            extra = sorted(set(update) - set(self.names))
            raise UpdateRejected(f"CSAHE: site {site}'s update keys differ from the layout (missing {missing}, extra {extra})")
        out = np.zeros(self.n_ciphertexts * SLOTS, dtype=np.float64)
        for name, shape, dtype, offset in zip(self.names, self.shapes, self.dtypes, self.offsets):
            arr = np.asarray(update[name])
            if tuple(arr.shape) != shape or arr.dtype.str != dtype:
                raise UpdateRejected(
                    f"CSAHE: site {site}'s entry '{name}' is {arr.dtype.str}{tuple(arr.shape)}, the layout says {dtype}{shape}"
                )
            out[offset : offset + arr.size] = arr.reshape(-1)
        return out

    def unpack(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of ``pack``: the dict with the original names, shapes and dtypes (padding ignored)."""
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.size < self.size:
            raise CSAHEError(f"CSAHE: cannot unpack a vector of shape {vector.shape}: the layout needs {self.size} values")
        out = {}
        for name, shape, dtype, offset in zip(self.names, self.shapes, self.dtypes, self.offsets):
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = vector[offset : offset + count].astype(np.dtype(dtype)).reshape(shape)
        return out


def _checked_vector(spec: PackSpec, update: Mapping[str, np.ndarray], weight: float, site: str) -> np.ndarray:
    vec = spec.pack(update, site=site)
    if not np.all(np.isfinite(vec)):
        raise UpdateRejected(f"CSAHE: site {site}'s update holds NaN or Inf; it cannot enter the ring")
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    if peak > MAX_ABS_UPDATE:
        raise UpdateRejected(
            f"CSAHE: site {site}'s update reaches |value| = {peak:.3g} > {MAX_ABS_UPDATE:.0f}; CKKS with coeff [60, 40] "
            "at scale 2^40 has no headroom for it (check the learning rate / the update)"
        )
    _check_weight(weight, site)
    return vec * float(weight)


def _check_weight(weight: float, site: str) -> None:
    if not (isinstance(weight, (int, float, np.floating, np.integer)) and math.isfinite(weight) and 0.0 < weight <= 1.0):
        raise UpdateRejected(f"CSAHE: site {site}'s weight {weight!r} must be a finite number in (0, 1] (see sample_weights)")


def sample_weights(counts: Mapping[str, float]) -> dict[str, float]:
    """w_k = n_k / sum n. Counts must be finite and positive (a site with no samples does not join the ring)."""
    if not counts:
        raise ConfigError("CSAHE: no sample counts given; pass {site: number of training samples}")
    for site, n in counts.items():
        try:
            value = float(n)
        except (TypeError, ValueError):
            raise UpdateRejected(f"CSAHE: site {site}'s sample count {n!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise UpdateRejected(f"CSAHE: site {site}'s sample count {n!r} must be finite and > 0")
    total = math.fsum(float(n) for n in counts.values())
    return {site: float(n) / total for site, n in counts.items()}


# ---------------------------------------------------------------------------------------------------------------------
# ring order, keys, messages


def ring_order(sites: Sequence[str], rng: secrets.SystemRandom | None = None) -> list[str]:
    """Random ring: the first site is the initiator, chosen (as the whole order) by a cryptographic RNG."""
    sites = list(sites)
    if len(set(sites)) != len(sites):
        raise ConfigError(f"CSAHE: duplicate site names in the ring {sites}")
    if len(sites) < MIN_SITES:
        raise ConfigError(
            f"CSAHE needs >= {MIN_SITES} participating sites, got {len(sites)} ({sites}): with 2 the initiator could "
            "recover the other site's update; use plain aggregation or add sites"
        )
    rng = rng if rng is not None else secrets.SystemRandom()
    rng.shuffle(sites)
    return sites


def _check_sigma(sigma: float) -> float:
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise ConfigError(f"CSAHE: mask sigma {sigma!r} is not a number") from None
    if not math.isfinite(sigma) or sigma < MIN_SIGMA:
        raise ConfigError(f"CSAHE: mask sigma = {sigma} is too small; it must be >= {MIN_SIGMA:g} to hide the update")
    if sigma > MAX_SIGMA:
        raise ConfigError(
            f"CSAHE: mask sigma = {sigma:g} exceeds {MAX_SIGMA:g}: 7 sigma would overflow the 19 value bits of "
            "CKKS coeff [60, 40] at scale 2^40"
        )
    return sigma


def _public_context(context: ts.Context) -> bytes:
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def _round_tag(public_context: bytes) -> bytes:
    return hashlib.sha256(public_context).digest()[:16]


class RoundKeys:
    """The initiator's fresh CKKS context for one round. The secret key stays in this object."""

    def __init__(self) -> None:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
        ctx.global_scale = 2.0**SCALE_BITS
        self._context = ctx
        self._public = _public_context(ctx)
        self.round_tag = _round_tag(self._public)

    def public_context_bytes(self) -> bytes:
        """The context without secret, Galois and relinearisation keys: what travels with the ciphertexts."""
        return self._public

    @property
    def context(self) -> ts.Context:
        """The private context (for the initiator's own encryption and decryption only)."""
        return self._context


class _PublicRound:
    """A member's view of a round: the public context and its tag."""

    def __init__(self, public_context: bytes, site: str) -> None:
        try:
            ctx = ts.context_from(bytes(public_context))
        except (ValueError, RuntimeError, TypeError) as exc:  # tenseal's errors on garbage
            raise CSAHEError(f"CSAHE: site {site} received a public context that does not deserialize ({exc})") from None
        if ctx.is_private():
            raise CSAHEError(
                f"CSAHE: site {site} received a context holding a secret key; the initiator must send only "
                "public_context_bytes(). Refusing to take part in this round"
            )
        self.context = ctx
        self.round_tag = _round_tag(bytes(public_context))


def _encode_message(tag: bytes, layout: bytes, index: int, count: int, payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, tag, layout, index, count) + payload


def message_payload(message: bytes) -> bytes:
    """The TenSEAL ciphertext bytes of one wire message (header stripped)."""
    return bytes(message[_HEADER.size :])


def message_header(message: bytes) -> tuple[bytes, bytes, int, int]:
    """(round tag, layout digest, index, count) of one wire message; ``CSAHEError`` when it is no ring message."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise CSAHEError(f"a ring message must be bytes, got {type(message).__name__}")
    message = bytes(message)
    if len(message) <= _HEADER.size:
        raise CSAHEError(f"the message is truncated ({len(message)} bytes)")
    magic, tag, layout, index, count = _HEADER.unpack_from(message)
    if magic != _MAGIC:
        raise CSAHEError("the message is not a CSAHE ring message (bad header)")
    return tag, layout, int(index), int(count)


def _decode_messages(
    messages: Sequence[bytes], context: ts.Context, tag: bytes, layout: bytes | None, expected: int, site: str,
    hop: str, keep: bool = True,
) -> list[ts.CKKSVector]:
    """Check every header (magic, round tag, layout, index/count) and deserialize each ciphertext under ``context``.

    ``layout`` None accepts the layout of the first message (all messages must then agree)."""
    if not isinstance(messages, (list, tuple)):
        raise CSAHEError(f"CSAHE: {hop} at site {site}: expected a list of ciphertext messages, got {type(messages).__name__}")
    if len(messages) != expected:
        raise CSAHEError(
            f"CSAHE: {hop} at site {site}: got {len(messages)} ciphertexts, the round's layout needs {expected}; "
            "discard this round's partial sums and re-run the round"
        )
    vectors = []
    for i, msg in enumerate(messages):
        try:
            msg_tag, msg_layout, index, count = message_header(msg)
        except CSAHEError as exc:
            raise CSAHEError(f"CSAHE: {hop} at site {site}: ciphertext {i}: {exc}") from None
        if msg_tag != tag:
            raise CSAHEError(
                f"CSAHE: {hop} at site {site}: ciphertext {i} was made under another round's context (round tag "
                f"{msg_tag.hex()[:12]} != {tag.hex()[:12]}); discard it and re-run the round"
            )
        if layout is None:
            layout = msg_layout
        if msg_layout != layout:
            raise CSAHEError(
                f"CSAHE: {hop} at site {site}: ciphertext {i} uses another parameter layout than this site's update "
                "(names/shapes/dtypes differ from the initiator's model)"
            )
        if index != i or count != expected:
            raise CSAHEError(f"CSAHE: {hop} at site {site}: ciphertext {i} is labelled {index}/{count}; expected {i}/{expected}")
        try:
            vec = ts.ckks_vector_from(context, message_payload(msg))
            size = vec.size()
        except (ValueError, RuntimeError, TypeError) as exc:  # tenseal's errors on garbage
            raise CSAHEError(
                f"CSAHE: {hop} at site {site}: ciphertext {i} does not deserialize under the round's context ({exc})"
            ) from None
        if size != SLOTS:
            raise CSAHEError(f"CSAHE: {hop} at site {site}: ciphertext {i} holds {size} values, expected {SLOTS}")
        if keep:  # a checking server keeps none (about 260 kB of memory per deserialized ciphertext)
            vectors.append(vec)
    return vectors


def validate_public_context(public_context: bytes, site: str = "?") -> ts.Context:
    """The deserialized public context of a round; ``CSAHEError`` when it is garbage or holds a secret key.

    The server calls it on what the initiator returns before relaying anything (a context holding a secret key is
    never relayed: that attempt fails and the initiator is dropped)."""
    if not isinstance(public_context, (bytes, bytearray, memoryview)):
        raise CSAHEError(f"CSAHE: site {site} returned a public context of type {type(public_context).__name__}, not bytes")
    return _PublicRound(bytes(public_context), site).context


def validate_messages(
    public_context: bytes | ts.Context,
    messages: Sequence[bytes],
    expected_count: int,
    layout_digest: bytes | None = None,
    round_tag: bytes | None = None,
    site: str = "?",
    hop: str = "reply",
) -> bytes:
    """Server-side check of a ring reply under the round's PUBLIC context; returns the messages' layout digest.

    Checks every message's header magic, round tag (sha256 of the round's public context), layout digest (when
    ``layout_digest`` is given; else all messages must agree), index/count against ``expected_count``, and that the
    ciphertext deserializes under the public context with ``SLOTS`` values. ``CSAHEError`` names ``site`` and ``hop``.
    ``public_context`` may be the bytes (the round tag is then their hash) or an already deserialized public context
    together with ``round_tag``."""
    if isinstance(public_context, ts.Context):
        if round_tag is None:
            raise ConfigError("validate_messages: pass round_tag with a deserialized context")
        context, tag = public_context, round_tag
    else:
        context = validate_public_context(public_context, site)
        tag = _round_tag(bytes(public_context))
        if round_tag is not None and round_tag != tag:
            raise CSAHEError(f"CSAHE: {hop} at site {site}: the public context is not this round's")
    if isinstance(expected_count, bool) or not isinstance(expected_count, (int, np.integer)) or expected_count < 1:
        raise ConfigError(f"validate_messages: expected_count must be a positive int, got {expected_count!r}")
    _decode_messages(messages, context, tag, layout_digest, int(expected_count), site, hop, keep=False)
    return message_header(messages[0])[1]


def round_tag(public_context: bytes) -> bytes:
    """16-byte tag of a round: sha256 of its public context (every message of the round carries it)."""
    return _round_tag(bytes(public_context))


def _encrypt(context: ts.Context, vec: np.ndarray) -> list[ts.CKKSVector]:
    return [ts.ckks_vector(context, vec[i * SLOTS : (i + 1) * SLOTS]) for i in range(vec.size // SLOTS)]


# ---------------------------------------------------------------------------------------------------------------------
# the two roles


class Initiator:
    """Initiator of one round: owns the keys, the mask R and its own weighted update until ``finish``."""

    def __init__(self, site: str, update: Mapping[str, np.ndarray], weight: float, sigma: float = 1e4) -> None:
        self.site = site
        self.sigma = _check_sigma(sigma)
        self.spec = PackSpec.from_update(update)
        self._weighted = _checked_vector(self.spec, update, weight, site)
        self.keys = RoundKeys()
        self._mask: np.ndarray | None = None
        self._started = False

    def public_context_bytes(self) -> bytes:
        return self.keys.public_context_bytes()

    def start(self) -> list[bytes]:
        """Wire messages of Enc(w_I * Delta_I + R); R ~ N(0, sigma^2) from a CSPRNG-seeded generator, kept here."""
        if self._started:
            raise CSAHEError(f"CSAHE: initiator {self.site} already started this round; create a new Initiator per round")
        self._started = True
        gen = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        self._mask = gen.normal(0.0, self.sigma, size=self._weighted.size)
        vectors = _encrypt(self.keys.context, self._weighted + self._mask)
        self._weighted = None  # the plain update is no longer needed
        tag, layout, count = self.keys.round_tag, self.spec.digest(), len(vectors)
        return [_encode_message(tag, layout, i, count, v.serialize()) for i, v in enumerate(vectors)]

    def finish(self, messages: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Decrypt the returned ring sum, remove R and unpack sum_k w_k * Delta_k."""
        if self._mask is None:
            raise CSAHEError(f"CSAHE: initiator {self.site} has no mask: call start() first; a round finishes once")
        vectors = _decode_messages(
            messages, self.keys.context, self.keys.round_tag, self.spec.digest(), self.spec.n_ciphertexts, self.site,
            "final hop",
        )
        total = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors]) - self._mask
        self._mask = None
        if not np.all(np.isfinite(total)):
            raise CSAHEError(f"CSAHE: the ring sum decrypted at initiator {self.site} holds NaN/Inf; discard the round")
        return self.spec.unpack(total)


class Prepared:
    """A member's own weighted update, encrypted ahead of its hop under one round's public context.

    Made by :func:`member_prepare`; stays at the site (it is never serialized or sent). Bound to ``round_tag`` (sha256
    of the public context it was encrypted under), ``layout`` (the update's PackSpec digest) and ``weight``; one
    :func:`member_hop` uses it (``take`` empties it: a second use, or a use after ``discard``, is a ``CSAHEError``).
    Holds ``count`` ciphertexts in memory (0.13-0.16 MB each: 0.5 GB for the 14.4 M-value UTNet, 35 MB for the
    quick job's 934,543 values) until then."""

    def __init__(self, site: str, round_tag: bytes, layout: bytes, weight: float, context: ts.Context,
                 vectors: list[ts.CKKSVector]) -> None:
        self.site = site
        self.round_tag = round_tag
        self.layout = layout
        self.weight = float(weight)
        self.count = len(vectors)
        self._context: ts.Context | None = context
        self._vectors: list[ts.CKKSVector] | None = vectors

    @property
    def used(self) -> bool:
        """True once a hop took the ciphertexts or they were discarded."""
        return self._vectors is None

    def matches(self, round_tag: bytes, layout: bytes, weight: float) -> bool:
        """Whether a hop of ``round_tag`` / ``layout`` with ``weight`` may use these (unused) ciphertexts."""
        return (not self.used and self.round_tag == round_tag and self.layout == layout
                and self.weight == float(weight))

    def take(self) -> tuple[ts.Context, list[ts.CKKSVector]]:
        """The context and the ciphertexts, once; ``CSAHEError`` afterwards."""
        if self._vectors is None or self._context is None:
            raise CSAHEError(f"CSAHE: site {self.site}'s prepared ciphertexts were already used or discarded; "
                             "encrypt in the hop (a prepared ciphertext is added to one running sum only)")
        context, vectors = self._context, self._vectors
        self._context, self._vectors = None, None
        return context, vectors

    def discard(self) -> None:
        """Drop the ciphertexts (a new attempt started, or the hop is over)."""
        self._context, self._vectors = None, None

    def __repr__(self) -> str:
        state = "used" if self.used else f"{self.count} ciphertexts"
        return f"Prepared(site={self.site!r}, round_tag={self.round_tag.hex()[:12]}, weight={self.weight:g}, {state})"


def member_prepare(site: str, public_context: bytes, update: Mapping[str, np.ndarray], weight: float) -> Prepared:
    """Encrypt Enc(w_j * Delta_j) under the round's public context ahead of the hop (the ``csahe_prepare`` step).

    Same checks as a hop: the context deserializes and holds no secret key, the update is finite and within CKKS
    headroom, the weight in (0, 1]. The result stays at the site; pass it to ``member_hop(..., prepared=...)``."""
    round_ = _PublicRound(public_context, site)
    spec = PackSpec.from_update(update)
    vectors = _encrypt(round_.context, _checked_vector(spec, update, weight, site))
    return Prepared(site, round_.round_tag, spec.digest(), float(weight), round_.context, vectors)


def member_hop(
    site: str,
    public_context: bytes,
    messages: Sequence[bytes],
    update: Mapping[str, np.ndarray],
    weight: float,
    hop: str | None = None,
    prepared: Prepared | None = None,
) -> list[bytes]:
    """A ring member adds Enc(w_j * Delta_j) to the running sum it received and returns the new wire messages.

    With ``prepared`` (from :func:`member_prepare` for THIS round: same round tag, i.e. the same public context, same
    layout and weight) the member's own ciphertexts are not made here: the hop deserializes the running sum under the
    prepared context, adds and serializes. A ``prepared`` for another round tag, layout, weight or site, or one
    already used, is refused with ``CSAHEError`` (it is never mixed into this round's sum); the caller may then
    encrypt in the hop (``prepared=None``). ``prepared`` is used up (or discarded) by this call, whatever happens."""
    hop = hop or f"hop to {site}"
    spec = PackSpec.from_update(update)
    if prepared is None:
        round_ = _PublicRound(public_context, site)
        context, tag, own = round_.context, round_.round_tag, None
    else:
        if not isinstance(public_context, (bytes, bytearray, memoryview)):
            prepared.discard()
            raise CSAHEError(f"CSAHE: {hop} at site {site}: the public context is a {type(public_context).__name__}, "
                             "not bytes")
        tag = _round_tag(bytes(public_context))
        refusal = None
        if prepared.site != site:
            refusal = f"the prepared ciphertexts are site {prepared.site}'s"
        elif prepared.used:
            refusal = "the prepared ciphertexts were already used or discarded"
        elif prepared.round_tag != tag:
            refusal = (f"the prepared ciphertexts were made under another round's context (round tag "
                       f"{prepared.round_tag.hex()[:12]} != {tag.hex()[:12]}); they are never added to this round's sum")
        elif prepared.layout != spec.digest():
            refusal = "the prepared ciphertexts hold another parameter layout"
        elif prepared.weight != float(weight):
            refusal = f"the prepared ciphertexts carry weight {prepared.weight!r}, the hop asks for {float(weight)!r}"
        if refusal is not None:
            prepared.discard()
            raise CSAHEError(f"CSAHE: {hop} at site {site}: {refusal}; discarded them: encrypt in the hop")
        context, own = prepared.take()
    vectors = _decode_messages(messages, context, tag, spec.digest(), spec.n_ciphertexts, site, hop)
    if own is None:
        own = _encrypt(context, _checked_vector(spec, update, weight, site))
    summed = [a + b for a, b in zip(vectors, own)]
    del vectors, own
    count = len(summed)
    return [_encode_message(tag, spec.digest(), i, count, v.serialize()) for i, v in enumerate(summed)]


# ---------------------------------------------------------------------------------------------------------------------
# in-memory reference round


@dataclass(frozen=True)
class RelayMessage:
    """One transfer the server relayed: who sent it, to whom, what kind, and the bytes."""

    sender: str
    receiver: str
    kind: str  # "public_context" or "ciphertext"
    data: bytes = field(repr=False)


def run_ring(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, float],
    sigma: float = 1e4,
    order: Sequence[str] | None = None,
    relay_log: MutableSequence[RelayMessage] | None = None,
    prepare: bool = True,
) -> dict[str, np.ndarray]:
    """Simulate one CSAHE round in memory; return sum_k w_k * Delta_k with w_k = n_k / sum n.

    ``order`` (initiator first) defaults to ``ring_order(sites)``; every transfer through the server is appended to
    ``relay_log`` when given (it holds bytes only: public contexts and ciphertext messages). With ``prepare`` (the
    protocol of :mod:`fedseg.algorithms.ring`) the server sends the initiator's public context to every member from
    the third site on right after "start" (``member_prepare``), while the first member's hop runs (it encrypts in
    its hop); the later hops add the prepared ciphertexts. ``prepare=False``: every member encrypts in its hop.
    """
    if set(updates) != set(counts):
        raise ConfigError(
            f"CSAHE: updates from {sorted(updates)} but sample counts for {sorted(counts)}; they must name the same sites"
        )
    order = list(order) if order is not None else ring_order(list(updates))
    if sorted(order) != sorted(updates):
        raise ConfigError(f"CSAHE: ring order {order} does not list exactly the sites {sorted(updates)}")
    ring_order(order)  # validates >= 3 distinct sites (its shuffle is discarded)
    weights = sample_weights(counts)
    log = relay_log if relay_log is not None else []

    initiator = Initiator(order[0], updates[order[0]], weights[order[0]], sigma=sigma)
    public = initiator.public_context_bytes()
    messages = initiator.start()
    prepared: dict[str, Prepared] = {}
    sender = order[0]
    for i, site in enumerate(order[1:]):
        log.append(RelayMessage(sender, site, "public_context", public))
        log.extend(RelayMessage(sender, site, "ciphertext", m) for m in messages)
        if prepare and i == 0:  # the parallel wave: the first member's hop and the later members' prepare
            for later in order[2:]:
                log.append(RelayMessage(order[0], later, "public_context", public))
                prepared[later] = member_prepare(later, public, updates[later], weights[later])
        messages = member_hop(site, public, messages, updates[site], weights[site], hop=f"hop {sender} -> {site}",
                              prepared=prepared.pop(site, None))
        sender = site
    log.extend(RelayMessage(sender, order[0], "ciphertext", m) for m in messages)
    return initiator.finish(messages)
