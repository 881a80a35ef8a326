"""FLARE's own TenSEAL homomorphic encryption (``nvflare.app_opt.he``) for fedseg jobs, with clear errors and checks.

Thin subclasses of FLARE's HE components with the same constructor arguments; what they add:

- **Context errors that say what to do.** Every component loads its TenSEAL context at START_RUN from the
  participant's ``startup/`` folder (FLARE's SecurityContentService). A missing, empty, unreadable or (in secure mode)
  unsigned file, a site context without the secret key or a server context *with* one stops the run at START_RUN
  (``system_panic``) with a message naming the file, the folder and the command that makes it, instead of FLARE's
  ``Cannot load tenseal_context ...: noSuchContent`` on the first task.
- **Mismatched contexts.** The encryptor puts a public fingerprint of its context into the DXO meta
  (``"he_context"``): ``params`` = sha256 of the context serialized with no keys at all (polynomial degree, modulus
  chain, scale: equal for every context of one HEBuilder run, server's included) and ``key_id`` = sha256 of a domain
  tag + the serialized secret key (equal for every site of one run; the server has no secret key). The relin keys
  are NOT usable as a shared fingerprint: TenSEAL does not store relin keys in a context that holds the secret key
  and generates fresh random ones each time such a file is loaded, so no serialization of a site's context equals
  the server's. :class:`HEAggregator` rejects, with a log line naming the site and the fix, an update whose
  ``params`` differ from the server context's, and one whose ``key_id`` differs from the key the run is bound to
  (the key of the encrypted global model, i.e. of the earlier rounds' updates; in the first round the first
  accepted update's). A site's decryptor refuses a global model encrypted under another key, so a site with a
  foreign key stops with a clear error instead of training on garbage.
- **No NaN/Inf leaves a site.** The encryptor refuses (names the tensor and the site) an update holding NaN/Inf
  before encrypting it: once encrypted, nobody could check it.
- **Integer buffers stay plaintext.** ``num_batches_tracked`` and index tables are never part of an update, so they
  are not in ``PROCESSED_KEYS`` of the global model; FLARE's decryptor raises ``KeyError`` on them, this one treats
  an entry missing from ``PROCESSED_KEYS`` as not encrypted (unless it is ciphertext).
- **Shapes.** CKKS vectors are flat; the encryptor records every tensor's shape (``"he_shapes"``, public), the
  aggregator carries it into the global model's meta, and the decryptor gives tensors back in their shapes.

Step weighting equals :class:`fedseg.flare.aggregator.FedGSAggregator`'s: the encryptor (``weigh_by_local_iter=True``)
multiplies the update by ``NUM_STEPS_CURRENT_ROUND`` before encrypting, the aggregator (``weigh_by_local_iter=False``)
adds the ciphertexts and multiplies by ``1 / sum(steps)`` (FLARE's DXOAggregator divides by the sum of the steps it
read from the meta), so the result is ``sum_k steps_k * U_k / sum_k steps_k``. An update that was not weighted the
way the server expects is rejected.

Trust model (FLARE's HEBuilder): every site holds the same secret key; the server holds none. The server sees only
ciphertexts and the global model stays encrypted on the server; any site can decrypt any update it gets hold of.
The server therefore neither evaluates a test centre nor keeps a best model in HE jobs (sites evaluate).

The module also holds the tenseal-only helpers shared with ``fedseg he-context`` / ``fedseg he-decrypt``
(:mod:`fedseg.commands.he_cmd`): context creation exactly as HEBuilder does it, fingerprints, and the format of the
encrypted model file (:func:`save_encrypted_model`, :func:`decrypt_model_file`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_opt.he.homomorphic_encrypt import deserialize_nested_dict
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor as _FlareDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor as _FlareEncryptor
from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter as _FlareSerializeFilter
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator as _FlareGenerator
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

from fedseg.errors import ConfigError, UpdateRejected

CLIENT_CONTEXT = "client_context.tenseal"  # nvflare.lighter.constants.ProvFileName.CLIENT_CONTEXT_TENSEAL
SERVER_CONTEXT = "server_context.tenseal"  # ProvFileName.SERVER_CONTEXT_TENSEAL
CONTEXT_META = "he_context"  # {"params": hex, "key_id": hex or None}
SHAPES_META = "he_shapes"  # {name: [dims]} of every tensor of the update / global model
WEIGHTED_META = "he_weighted_by_steps"  # True when the encryptor multiplied the update by its step count
ENCRYPTED_MODEL_FORMAT = "fedseg-he-model/1"
_KEY_ID_TAG = b"fedseg-he-key-id/1\x00"

HOW_TO_MAKE = (
    "Make the TenSEAL contexts with: `fedseg he-context --workspace WS` before `nvflare simulator JOB -w WS` "
    "(simulator: it copies WS/startup to every participant); `nvflare poc prepare -he` (POC); the HE builder "
    "(path: nvflare.lighter.impl.he.HEBuilder) in the builders of project.yml, then provision again (provisioned "
    "system). Every participant must get the files of one and the same run."
)


class HEContextError(ConfigError):
    """A TenSEAL context file is missing, unreadable, unsigned (secure mode) or of the wrong kind."""


# ---------------------------------------------------------------------- tenseal-only helpers
def make_contexts(poly_modulus_degree: int = 8192, coeff_mod_bit_sizes=(60, 40, 40),
                  scale_bits: int = 40) -> tuple[bytes, bytes]:
    """(server context, client context) serialized exactly as FLARE's provisioning HEBuilder writes them: one CKKS
    context with symmetric encryption and relin keys; the server's without secret (and public) key, the sites' with.
    Uses HEBuilder itself, so the files are the same kind as `nvflare poc prepare -he` and provisioning make."""
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder(poly_modulus_degree=int(poly_modulus_degree),
                        coeff_mod_bit_sizes=[int(b) for b in coeff_mod_bit_sizes], scale_bits=int(scale_bits))
    builder.initialize(None, None)  # HEBuilder.initialize uses neither the project nor the provision context
    return builder.get_serialized_context(is_client=False), builder.get_serialized_context(is_client=True)


def has_secret_key(ctx: ts.Context) -> bool:
    return bool(ctx.has_secret_key())


def params_fingerprint(ctx: ts.Context) -> str:
    """sha256 of the context serialized with no keys (scheme parameters and scale): equal for the server and site
    contexts of one HEBuilder run, and for any two runs with the same parameters."""
    return hashlib.sha256(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                        save_relin_keys=False)).hexdigest()


def key_fingerprint(ctx: ts.Context) -> str | None:
    """Key id: sha256 of a domain tag + the serialized secret key (deterministic; None without a secret key).
    Equal for every site of one HEBuilder run, different between runs. A hash of a high-entropy key reveals nothing
    usable about it."""
    if not has_secret_key(ctx):
        return None
    data = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return hashlib.sha256(_KEY_ID_TAG + data).hexdigest()


def context_fingerprint(ctx: ts.Context) -> dict[str, str | None]:
    return {"params": params_fingerprint(ctx), "key_id": key_fingerprint(ctx)}


def _short(h: str | None) -> str:
    return h[:12] if h else "none"


def check_role(ctx: ts.Context, where: str, role: str) -> None:
    """role "client": a site context must hold the shared secret key (symmetric CKKS encrypts and decrypts with it);
    role "server": the server context must hold none (else the server could decrypt every site's update)."""
    if role == "client" and not has_secret_key(ctx):
        raise HEContextError(f"TenSEAL context {where} holds no secret key: it is a server context. A site needs "
                             f"{CLIENT_CONTEXT} (the secret key shared by the sites) in its startup folder. "
                             f"{HOW_TO_MAKE}")
    if role == "server" and has_secret_key(ctx):
        raise HEContextError(f"TenSEAL context {where} holds a secret key: with it the server could decrypt every "
                             f"site's update. The server needs {SERVER_CONTEXT} without secret key (as HEBuilder "
                             f"writes it); never give the server a site's {CLIENT_CONTEXT}. {HOW_TO_MAKE}")


def read_context(path: str | os.PathLike, role: str | None = None) -> ts.Context:
    """A TenSEAL context from a file path (commands and tests); HEContextError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise HEContextError(f"TenSEAL context {path} does not exist. A site's context is "
                             f"<site workspace>/startup/{CLIENT_CONTEXT}. {HOW_TO_MAKE}")
    data = path.read_bytes()
    ctx = _parse(data, str(path))
    if role:
        check_role(ctx, str(path), role)
    return ctx


def _parse(data: bytes | None, where: str) -> ts.Context:
    if not data:
        raise HEContextError(f"TenSEAL context {where} is empty. {HOW_TO_MAKE}")
    try:
        return ts.context_from(data)
    except Exception as e:  # noqa: BLE001  (tenseal raises several types for garbage)
        raise HEContextError(f"TenSEAL context {where} is not a readable TenSEAL context ({type(e).__name__}: {e}); "
                             f"write it again. {HOW_TO_MAKE}") from e


def load_context(file_name: str, fl_ctx: FLContext, role: str) -> ts.Context:
    """The participant's context from its startup folder, as FLARE's ``load_tenseal_context_from_workspace`` loads it
    (SecurityContentService; in secure mode the file must be signed by the provisioning), with clear errors."""
    folder = SecurityContentService.content_folder
    if SecurityContentService.security_content_manager is None:
        raise HEContextError(f"cannot look up TenSEAL context {file_name!r}: this process has no startup folder "
                             "(FLARE's SecurityContentService is not initialized); run the job with nvflare "
                             "(simulator, POC or a provisioned system)")
    where = f"{file_name!r} in {folder}"
    data, rc = SecurityContentService.load_content(file_name)
    if rc == LoadResult.NO_SUCH_CONTENT:
        kind = "the sites' context (with the shared secret key)" if role == "client" else \
            "the server's context (no secret key)"
        raise HEContextError(f"TenSEAL context {file_name!r} ({kind}) not found in the startup folder {folder}. "
                             f"{HOW_TO_MAKE}")
    if rc == LoadResult.INVALID_CONTENT:
        raise HEContextError(f"TenSEAL context {where} has invalid content. {HOW_TO_MAKE}")
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True):
        if rc == LoadResult.NOT_SIGNED:
            raise HEContextError(
                f"TenSEAL context {where} is not signed (secure mode: the startup kit's signature.json has no "
                f"entry for it). In a provisioned system the contexts must come from provisioning with "
                f"nvflare.lighter.impl.he.HEBuilder in project.yml (provisioning signs them); a file copied in by "
                f"hand or written by `fedseg he-context` is refused in secure mode. {HOW_TO_MAKE}")
        if rc == LoadResult.INVALID_SIGNATURE:
            raise HEContextError(f"TenSEAL context {where} does not match its signature in signature.json (the file "
                                 f"was changed after provisioning); restore the provisioned file or provision "
                                 f"again. {HOW_TO_MAKE}")
    ctx = _parse(data, where)
    check_role(ctx, where, role)
    return ctx


def _is_cipher(value) -> bool:
    return isinstance(value, (ts.CKKSVector, bytes))


def _size(value) -> int | None:
    """Number of values of a tensor or CKKS vector (None for serialized ciphertext, whose size needs the context)."""
    if isinstance(value, ts.CKKSVector):
        return int(value.size())
    if isinstance(value, bytes):
        return None
    return int(np.size(value))


def _shapes_of(weights: Mapping[str, Any]) -> dict[str, list[int]]:
    return {k: [int(d) for d in np.shape(v)] for k, v in weights.items() if not _is_cipher(v)}


# ---------------------------------------------------------------------- FLARE components
class _ContextMixin:
    """START_RUN loading with clear errors; ``_context(fl_ctx)`` for the processing paths."""

    _role = "client"

    def _load_context(self, fl_ctx: FLContext):
        self._context_error = None
        try:
            ctx = load_context(self.tenseal_context_file, fl_ctx, self._role)
        except HEContextError as e:
            site = fl_ctx.get_identity_name() or "?"
            self._context_error = f"{type(self).__name__} at {site}: {e}"
            self.log_error(fl_ctx, self._context_error)
            self.system_panic(self._context_error, fl_ctx)
            return None
        self.fingerprint = context_fingerprint(ctx)
        self.log_info(fl_ctx, f"TenSEAL context {self.tenseal_context_file} loaded (params "
                      f"{_short(self.fingerprint['params'])}, key id {_short(self.fingerprint['key_id'])})")
        return ctx

    def _context(self, fl_ctx: FLContext):
        if self.tenseal_context is None:
            if getattr(self, "_context_error", None):
                raise HEContextError(self._context_error)
            self.tenseal_context = self._load_context(fl_ctx)
            if self.tenseal_context is None:
                raise HEContextError(self._context_error)
        return self.tenseal_context

    def _context_events(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.tenseal_context = self._load_context(fl_ctx)
        elif event_type == EventType.END_RUN:
            self.tenseal_context = None


class HEModelEncryptor(_ContextMixin, _FlareEncryptor):
    """FLARE's task-result encryptor (same arguments) + NaN/Inf refusal, context fingerprint and shapes in the meta.

    ``serialize_ciphertexts`` (default True): send each ciphertext as its serialized bytes, which
    :class:`HEAggregator` reads with the server context. FLARE's own wire format (False) pickles every CKKS vector
    together with a copy of its context including the relin keys (about 660 kB with the default parameters), i.e.
    one context copy per tensor of the model in every update; the ciphertexts are the same either way.
    """

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT, encrypt_layers=None, aggregation_weights=None,
                 weigh_by_local_iter: bool = True, data_kinds=None, serialize_ciphertexts: bool = True):
        super().__init__(tenseal_context_file=tenseal_context_file, encrypt_layers=encrypt_layers,
                         aggregation_weights=aggregation_weights, weigh_by_local_iter=weigh_by_local_iter,
                         data_kinds=data_kinds)
        self.fingerprint = None
        self.serialize_ciphertexts = bool(serialize_ciphertexts)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        self._context_events(event_type, fl_ctx)
        if event_type == EventType.START_RUN and self.encrypt_layers is None:
            self.encrypt_layers = [True]  # FLARE's marker for "every tensor"

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        self._context(fl_ctx)
        if self.encrypt_layers is None:
            self.encrypt_layers = [True]
        site = fl_ctx.get_identity_name() or "?"
        for name, value in dxo.data.items():
            arr = np.asarray(value)
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                n_bad = int(arr.size - np.isfinite(arr).sum())
                raise UpdateRejected(f"site {site!r}: entry {name!r} of the update holds {n_bad} NaN/Inf values; it "
                                     "is not encrypted and not sent (local training diverged: lower the learning "
                                     "rate or check this site's data)")
        shapes = _shapes_of(dxo.data)
        dtypes = {k: np.asarray(v).dtype for k, v in dxo.data.items()}
        out = super().process_dxo(dxo, shareable, fl_ctx)
        # FLARE weighs the tensors it leaves in plaintext (encrypt_layers) by np.float64(n_iter), which under numpy 2
        # upcasts float32 to float64 and doubles their bytes on the wire: give them back their own dtype.
        for k, v in list(out.data.items()):
            if isinstance(v, np.ndarray) and k in dtypes and np.issubdtype(dtypes[k], np.floating) \
                    and v.dtype != dtypes[k]:
                out.data[k] = v.astype(dtypes[k])
        out.set_meta_prop(CONTEXT_META, dict(self.fingerprint))
        out.set_meta_prop(SHAPES_META, shapes)
        out.set_meta_prop(WEIGHTED_META, bool(self.weigh_by_local_iter))
        if self.serialize_ciphertexts:
            out.data = {k: (v.serialize() if isinstance(v, ts.CKKSVector) else v) for k, v in out.data.items()}
        return out


class HEModelDecryptor(_ContextMixin, _FlareDecryptor):
    """FLARE's task-data decryptor (same arguments) + key check, plaintext integer buffers, tensors in their shapes."""

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT, data_kinds=None):
        super().__init__(tenseal_context_file=tenseal_context_file, data_kinds=data_kinds)
        self.fingerprint = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        self._context_events(event_type, fl_ctx)

    def decryption(self, params: dict, encrypted_layers: dict, fl_ctx: FLContext):
        """Entries missing from PROCESSED_KEYS (integer buffers, never in an update) are plaintext unless they hold
        ciphertext."""
        full = {k: bool(encrypted_layers.get(k, _is_cipher(v))) for k, v in params.items()}
        return super().decryption(params, full, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        self._context(fl_ctx)
        site = fl_ctx.get_identity_name() or "?"
        theirs = dxo.get_meta_prop(CONTEXT_META)
        if isinstance(theirs, Mapping) and dxo.get_meta_prop(MetaKey.PROCESSED_KEYS):
            if theirs.get("params") and theirs["params"] != self.fingerprint["params"]:
                raise HEContextError(
                    f"site {site!r}: the global model was encrypted with other TenSEAL parameters (params "
                    f"{_short(theirs['params'])}) than this site's {self.tenseal_context_file} "
                    f"({_short(self.fingerprint['params'])}). {HOW_TO_MAKE}")
            if theirs.get("key_id") and theirs["key_id"] != self.fingerprint["key_id"]:
                raise HEContextError(
                    f"site {site!r}: the global model is encrypted under key id {_short(theirs['key_id'])} (the key of "
                    f"the other sites), this site's {self.tenseal_context_file} holds key id "
                    f"{_short(self.fingerprint['key_id'])}: it cannot decrypt the model. Copy the {CLIENT_CONTEXT} "
                    f"that the other sites use (one HEBuilder / he-context run) into this site's startup folder "
                    f"({SecurityContentService.content_folder}). {HOW_TO_MAKE}")
        shapes = dxo.get_meta_prop(SHAPES_META) or {}
        out = super().process_dxo(dxo, shareable, fl_ctx)
        if out is None:
            return None
        for name, value in list(out.data.items()):
            arr = np.asarray(value, dtype=np.float32) if isinstance(value, list) else np.asarray(value)
            shape = shapes.get(name)
            if shape is not None and arr.size == int(np.prod(shape)) and list(arr.shape) != list(shape):
                arr = arr.reshape(shape)
            out.data[name] = arr
        return out


class HEAggregator(_ContextMixin, HEInTimeAccumulateWeightedAggregator):
    """FLARE's HE in-time aggregator (same arguments) + checks of every contribution before it is added.

    Rejected (log line naming the site and the fix; the round goes on with the others): an update that is not
    encrypted by :class:`HEModelEncryptor`, encrypted with other parameters than the server context's, under another
    key than the run's, weighted the wrong way for this aggregator, with steps <= 0, or whose tensors do not match
    the global model. ``tenseal_context_file``: the server context (no secret key) the parameters are checked against.
    """

    _role = "server"

    def __init__(self, exclude_vars=None, aggregation_weights=None, expected_data_kind=DataKind.WEIGHT_DIFF,
                 weigh_by_local_iter: bool = False, tenseal_context_file: str = SERVER_CONTEXT):
        super().__init__(exclude_vars=exclude_vars, aggregation_weights=aggregation_weights,
                         expected_data_kind=expected_data_kind, weigh_by_local_iter=weigh_by_local_iter)
        self.weigh_by_local_iter = bool(weigh_by_local_iter)
        self.tenseal_context_file = tenseal_context_file
        self.tenseal_context = None
        self.fingerprint = None
        self.run_key = None  # (key_id, site that fixed it) once the first update of the run is accepted
        self.rejected: dict[str, str] = {}
        self._accepted: list[str] = []
        self._steps = 0.0
        self._shapes: dict[str, list[int]] = {}
        self._round = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        self._context_events(event_type, fl_ctx)
        super().handle_event(event_type, fl_ctx)

    def reset(self, fl_ctx: FLContext):
        self.rejected, self._accepted, self._steps, self._shapes = {}, [], 0.0, {}

    def _reject(self, fl_ctx: FLContext, site: str, reason: str) -> bool:
        self.rejected[site] = reason
        self.log_error(fl_ctx, f"rejected the update of site {site!r}: {reason}")
        return False

    @staticmethod
    def _global(fl_ctx: FLContext):
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or {}
        return (model.get(ModelLearnableKey.WEIGHTS) or {}), (model.get(ModelLearnableKey.META) or {})

    def _bound_key(self, fl_ctx: FLContext):
        _, meta = self._global(fl_ctx)
        ctx_meta = meta.get(CONTEXT_META) if isinstance(meta, Mapping) else None
        if isinstance(ctx_meta, Mapping) and ctx_meta.get("key_id"):
            return ctx_meta["key_id"], "the encrypted global model (the sites' updates of earlier rounds)"
        if self.run_key:
            return self.run_key[0], f"site {self.run_key[1]!r} (the first update accepted in this run)"
        return None, None

    def _check(self, dxo: DXO, site: str, fl_ctx: FLContext) -> str | None:
        ctx_meta = dxo.get_meta_prop(CONTEXT_META)
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != HE_ALGORITHM_CKKS or not isinstance(ctx_meta, Mapping):
            return ("the update is not encrypted by fedseg.flare.he.HEModelEncryptor (the site's client config lacks "
                    "the encryptor in task_result_filters, or the site runs another fedseg version); an HE job "
                    "accepts encrypted updates only")
        if ctx_meta.get("params") != self.fingerprint["params"]:
            return (f"its TenSEAL context has other encryption parameters (params {_short(ctx_meta.get('params'))}) "
                    f"than the server's {self.tenseal_context_file} ({_short(self.fingerprint['params'])}): the "
                    f"site's {CLIENT_CONTEXT} and the server's {SERVER_CONTEXT} come from different HEBuilder / "
                    f"he-context runs. Give every participant the files of one run. {HOW_TO_MAKE}")
        key, source = self._bound_key(fl_ctx)
        if key and ctx_meta.get("key_id") != key:
            return (f"it is encrypted under key id {_short(ctx_meta.get('key_id'))}, but this run's key is "
                    f"{_short(key)} (from {source}): the site's {CLIENT_CONTEXT} is not the one the other sites "
                    f"use. Copy the sites' common {CLIENT_CONTEXT} (one HEBuilder / he-context run) into its startup "
                    f"folder. {HOW_TO_MAKE}")
        weighted = dxo.get_meta_prop(WEIGHTED_META)
        if weighted is not None and bool(weighted) == self.weigh_by_local_iter:
            return (f"step weighting does not match: the site's HEModelEncryptor has weigh_by_local_iter="
                    f"{bool(weighted)} and the server's HEAggregator weigh_by_local_iter={self.weigh_by_local_iter}; "
                    "exactly one of them must weight by the local steps (fedseg jobs: the encryptor)")
        try:
            steps = float(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
        except (TypeError, ValueError):
            steps = float("nan")
        if not steps > 0:
            return f"NUM_STEPS_CURRENT_ROUND must be > 0, got {dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)}"
        return None

    def _check_tensors(self, dxo: DXO, fl_ctx: FLContext) -> str | None:
        weights, meta = self._global(fl_ctx)
        if not weights:
            return None
        ref_shapes = dict(meta.get(SHAPES_META) or {}) if isinstance(meta, Mapping) else {}
        ref_shapes.update(_shapes_of(weights))
        float_keys = {k for k, v in weights.items()
                      if _is_cipher(v) or np.issubdtype(np.asarray(v).dtype, np.floating)}
        data = dxo.data or {}
        missing, unknown = sorted(float_keys - set(data)), sorted(set(data) - float_keys)
        if missing or unknown:
            return (f"the update does not match the global model (missing {missing[:5]}, unknown {unknown[:5]}); the "
                    "site probably runs a different model configuration")
        for name, value in data.items():
            shape = ref_shapes.get(name)
            size = _size(value)
            if shape is not None and size is not None and size != int(np.prod(shape)):
                return f"entry {name!r} has {size} values, the global model has shape {tuple(shape)}"
            if not _is_cipher(value):
                arr = np.asarray(value)
                if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                    return f"plaintext entry {name!r} holds NaN/Inf values"
        return None

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if self._round != current_round:
            self.reset(fl_ctx)
            self._round = current_round
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            return self._reject(fl_ctx, site, f"the site returned {rc} (see the site's log)")
        if self.tenseal_context is None:
            self._context(fl_ctx)
        try:
            dxo = from_shareable(shareable)
        except Exception as e:  # noqa: BLE001  (malformed payload)
            return self._reject(fl_ctx, site, f"the result holds no DXO ({e})")
        reason = self._check(dxo, site, fl_ctx)
        if not reason and any(isinstance(v, bytes) for v in (dxo.data or {}).values()):
            try:  # serialized ciphertexts (HEModelEncryptor's default wire format): read with the server context
                dxo.data = {k: (ts.ckks_vector_from(self.tenseal_context, v) if isinstance(v, bytes) else v)
                            for k, v in dxo.data.items()}
            except Exception as e:  # noqa: BLE001  (tenseal raises several types for foreign ciphertext)
                reason = (f"its ciphertexts cannot be read with the server's {self.tenseal_context_file} "
                          f"({type(e).__name__}: {e}); the site and the server need contexts of one run. {HOW_TO_MAKE}")
            else:
                dxo.update_shareable(shareable)
        reason = reason or self._check_tensors(dxo, fl_ctx)
        if reason:
            return self._reject(fl_ctx, site, reason)
        if not super().accept(shareable, fl_ctx):
            return self._reject(fl_ctx, site, "FLARE's aggregator refused it (wrong round, a second update from the "
                                "site, or another data kind; see the warning above)")
        steps = float(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
        self._accepted.append(site)
        self._steps += steps
        self._shapes.update(dxo.get_meta_prop(SHAPES_META) or {})
        if self.run_key is None:
            self.run_key = (dxo.get_meta_prop(CONTEXT_META).get("key_id"), site)
        self.log_info(fl_ctx, f"accepted the encrypted update of site {site!r} ({int(steps)} steps) for round "
                      f"{current_round}")
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        weights, meta = self._global(fl_ctx)
        meta = dict(meta) if isinstance(meta, Mapping) else {}
        accepted = list(self._accepted) if self._round == current_round else []
        if accepted:
            dxo = from_shareable(super().aggregate(fl_ctx))
            self.log_info(fl_ctx, f"round {current_round}: aggregated {len(accepted)} site(s) {accepted} "
                          f"(ciphertexts), {int(self._steps)} steps in total")
        else:
            super().aggregate(fl_ctx)  # clears FLARE's (empty) accumulator
            dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data={})
            self.log_error(fl_ctx, f"round {current_round}: no valid encrypted update (rejected: "
                           f"{self.rejected or 'none'}); the global model is kept unchanged this round")
        # PROCESSED_KEYS for the whole global model: the update's entries by type, the others as they are now
        prev = meta.get(MetaKey.PROCESSED_KEYS) or {}
        keys = {k: bool(prev.get(k, _is_cipher(v))) for k, v in weights.items()}
        keys.update({k: isinstance(v, ts.CKKSVector) for k, v in dxo.data.items()})
        shapes = dict(meta.get(SHAPES_META) or {})
        shapes.update(_shapes_of(weights))
        shapes.update(self._shapes)
        key, _ = self._bound_key(fl_ctx)
        dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, keys)
        dxo.set_meta_prop(MetaKey.PROCESSED_ALGORITHM, HE_ALGORITHM_CKKS)
        dxo.set_meta_prop(CONTEXT_META, {"params": self.fingerprint["params"], "key_id": key})
        dxo.set_meta_prop(SHAPES_META, shapes)
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, self._steps if accepted else 0)
        dxo.set_meta_prop("contributors", accepted)
        self.reset(fl_ctx)
        self._round = None
        return dxo.to_shareable()


class HEModelShareableGenerator(_ContextMixin, _FlareGenerator):
    """FLARE's HE shareable generator (same arguments) + an empty round keeps the global model, and plaintext
    entries keep their shapes (FLARE's adds flattened arrays)."""

    _role = "server"

    def __init__(self, tenseal_context_file: str = SERVER_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file)
        self.fingerprint = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        self._context_events(event_type, fl_ctx)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        ctx = self._context(fl_ctx)
        dxo = from_shareable(shareable)
        base = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if dxo.data_kind == DataKind.WEIGHT_DIFF and not dxo.data and base:
            deserialize_nested_dict(base, context=ctx)
            base[ModelLearnableKey.META] = {**(base.get(ModelLearnableKey.META) or {}), **dxo.get_meta_props()}
            return base
        shapes = {k: np.shape(v) for k, v in (base or {}).get(ModelLearnableKey.WEIGHTS, {}).items()
                  if isinstance(v, np.ndarray)}
        model = super().shareable_to_learnable(shareable, fl_ctx)
        weights = model[ModelLearnableKey.WEIGHTS]
        for k, v in weights.items():
            if isinstance(v, np.ndarray) and k in shapes and v.shape != shapes[k] and v.size == int(np.prod(shapes[k])):
                weights[k] = v.reshape(shapes[k])
        return model


class HEModelSerializeFilter(_ContextMixin, _FlareSerializeFilter):
    """FLARE's persistor filter for encrypted models (same arguments) with the clear context errors."""

    _role = "server"

    def __init__(self, tenseal_context_file: str = SERVER_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file)
        self.fingerprint = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        self._context_events(event_type, fl_ctx)

    def process_post_load(self, learnable, fl_ctx: FLContext):
        self._context(fl_ctx)
        return super().process_post_load(learnable, fl_ctx)

    def process_post_save(self, learnable, fl_ctx: FLContext):
        self._context(fl_ctx)
        return super().process_post_save(learnable, fl_ctx)

    def process_post_get(self, learnable, fl_ctx: FLContext):
        self._context(fl_ctx)
        return super().process_post_get(learnable, fl_ctx)


# ---------------------------------------------------------------------- the encrypted model file
def save_encrypted_model(path: str | os.PathLike, weights: Mapping[str, Any], meta: Mapping[str, Any] | None,
                         shapes: Mapping[str, Any] | None = None) -> Path:
    """Write the (partly) encrypted global model as ``torch.save`` of a plain dict (loads with weights_only=True):

    ``{"format": "fedseg-he-model/1", "entries": {name: bytes (serialized CKKS vector, flat) | tensor},
    "encrypted": {name: bool}, "shapes": {name: [dims]}, "he_context": {"params", "key_id"} or None,
    "decrypt": "fedseg he-decrypt ..."}``. Ciphertexts are flat; ``shapes`` gives every tensor's shape.
    """
    import torch

    meta = dict(meta or {})
    all_shapes = {k: [int(d) for d in v] for k, v in dict(meta.get(SHAPES_META) or {}).items()}
    all_shapes.update({k: [int(d) for d in v] for k, v in dict(shapes or {}).items()})
    entries, encrypted = {}, {}
    for name, value in weights.items():
        if isinstance(value, ts.CKKSVector):
            value = value.serialize()
        if isinstance(value, bytes):
            entries[name], encrypted[name] = value, True
        else:
            arr = np.asarray(value)
            entries[name], encrypted[name] = torch.as_tensor(arr), False
            all_shapes.setdefault(name, list(arr.shape))
    payload = {"format": ENCRYPTED_MODEL_FORMAT, "entries": entries, "encrypted": encrypted,
               "shapes": {k: all_shapes[k] for k in entries if k in all_shapes},
               "he_context": dict(meta[CONTEXT_META]) if isinstance(meta.get(CONTEXT_META), Mapping) else None,
               "decrypt": "fedseg he-decrypt --model THIS_FILE --context <site workspace>/startup/"
                          f"{CLIENT_CONTEXT} --out global_model.pt"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def read_model_file(path: str | os.PathLike) -> dict:
    """(entries, encrypted, shapes, he_context) of an encrypted model: fedseg's results/global_model_encrypted.pt
    or FLARE's persistor checkpoint (app_server/FL_global_model.pt of an HE job)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist (results/global_model_encrypted.pt of an HE run, or "
                          f"app_server/FL_global_model.pt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    if isinstance(data, Mapping) and data.get("format") == ENCRYPTED_MODEL_FORMAT:
        return {"entries": dict(data["entries"]), "encrypted": dict(data["encrypted"]),
                "shapes": dict(data.get("shapes") or {}), "he_context": data.get("he_context")}
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):  # PTFileModelPersistor's format
        meta = dict(data.get("meta_props") or {})
        entries = dict(data["model"])
        processed = dict(meta.get(MetaKey.PROCESSED_KEYS) or {})
        shapes = {k: list(v) for k, v in dict(meta.get(SHAPES_META) or {}).items()}
        shapes.update({k: list(v) for k, v in dict(data.get("tensor_shapes") or {}).items()})
        return {"entries": entries,
                "encrypted": {k: bool(processed.get(k, isinstance(v, bytes))) for k, v in entries.items()},
                "shapes": shapes, "he_context": meta.get(CONTEXT_META)}
    raise ConfigError(f"{path} is neither an encrypted fedseg model ({ENCRYPTED_MODEL_FORMAT}) nor a FLARE "
                      "persistor checkpoint ({'model': ..., 'meta_props': ...})")


def decrypt_model_file(path: str | os.PathLike, ctx: ts.Context, context_name: str = "the context") -> dict:
    """Plaintext state dict {name: float32/int tensor in its shape} of an encrypted model file, decrypted with a
    site's context (which must hold the secret key and, when the file records it, the same key id)."""
    import torch

    if not has_secret_key(ctx):
        raise HEContextError(f"{context_name} holds no secret key (it is a server context); decrypt with a site's "
                             f"{CLIENT_CONTEXT}")
    info = read_model_file(path)
    recorded = info.get("he_context") or {}
    mine = context_fingerprint(ctx)
    if recorded.get("params") and recorded["params"] != mine["params"]:
        raise HEContextError(f"{path} was encrypted with other TenSEAL parameters (params "
                             f"{_short(recorded['params'])}) than {context_name} ({_short(mine['params'])})")
    if recorded.get("key_id") and recorded["key_id"] != mine["key_id"]:
        raise HEContextError(f"{path} was encrypted under key id {_short(recorded['key_id'])}, {context_name} holds "
                             f"key id {_short(mine['key_id'])}: use the {CLIENT_CONTEXT} of a site of that run")
    state = {}
    for name, value in info["entries"].items():
        shape = info["shapes"].get(name)
        if info["encrypted"].get(name):
            if not isinstance(value, bytes):
                raise ConfigError(f"{path}: entry {name!r} is marked encrypted but holds {type(value).__name__}")
            try:
                arr = np.asarray(ts.ckks_vector_from(ctx, value).decrypt(), dtype=np.float32)
            except Exception as e:  # noqa: BLE001
                raise HEContextError(f"{path}: entry {name!r} cannot be decrypted with {context_name} "
                                     f"({type(e).__name__}: {e})") from e
            tensor = torch.from_numpy(arr)
        else:
            tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        if shape is not None:
            if tensor.numel() != int(np.prod(shape)):
                raise ConfigError(f"{path}: entry {name!r} has {tensor.numel()} values, its recorded shape is "
                                  f"{tuple(shape)}")
            tensor = tensor.reshape([int(d) for d in shape])
        state[name] = tensor
    return state
