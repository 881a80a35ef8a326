"""FLARE startup kits on disk: what a kit is, where a system's kits are, and whether a kit's certificate is usable.

A provisioned (or POC) system is a folder of kits, one per participant (``nvflare provision`` writes
``<workspace>/<project>/prod_NN/<participant>/``): the server's kit has ``startup/fed_server.json``, a site's
``startup/fed_client.json``, an admin's ``startup/fed_admin.json``. Every kit carries the project's root CA
(``startup/rootCA.pem``) and its own certificate, signed by that CA.

:func:`check_kit` looks at a kit before anything connects with it, so that a wrong or stale kit fails with a message
that names the file and says what to do, instead of a TLS error or a timeout: a missing file, a certificate that has
expired or is not yet valid, a certificate that the kit's own root CA did not sign (files mixed from two
provisionings), or a kit of another project than the system's (``expect_root``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedseg.errors import ConfigError

KIND_FILES = {"server": "fed_server.json", "client": "fed_client.json", "admin": "fed_admin.json"}
CERT_FILES = {"server": ("server.crt", "server.key"), "client": ("client.crt", "client.key"),
              "admin": ("client.crt", "client.key")}


class KitError(ConfigError):
    """A startup kit that cannot be used (names the file and the fix)."""


@dataclass(frozen=True)
class Kit:
    path: Path
    name: str  # the participant's name: the kit folder's name (site-1, admin@hospital-a.org, the server's FQDN)
    kind: str  # "server" | "client" | "admin"

    @property
    def startup(self) -> Path:
        return self.path / "startup"

    @property
    def local(self) -> Path:
        return self.path / "local"

    def config(self) -> dict:
        return json.loads((self.startup / KIND_FILES[self.kind]).read_text())

    @property
    def cert(self) -> Path:
        return self.startup / CERT_FILES[self.kind][0]

    @property
    def root_ca(self) -> Path:
        return self.startup / "rootCA.pem"


def read_kit(path: str | Path) -> Kit:
    """The kit at ``path`` (the folder that holds ``startup/``). KitError when it is not one."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise KitError(f"startup kit {path} does not exist; pass the folder that holds startup/ (for an admin: "
                       "<workspace>/<project>/prod_NN/<admin email>)")
    for kind, fname in KIND_FILES.items():
        if (path / "startup" / fname).is_file():
            return Kit(path=path, name=path.name, kind=kind)
    raise KitError(f"{path} is not a FLARE startup kit: {path / 'startup'} has none of "
                   f"{', '.join(KIND_FILES.values())}; pass the kit folder that nvflare provision wrote")


def latest_prod_dir(root: str | Path) -> Path:
    """The folder of kits under ``root``: ``root`` itself when it holds kits, else the newest ``prod_NN`` below it
    (``<workspace>/prod_NN`` or ``<workspace>/<project>/prod_NN``)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise KitError(f"{root} does not exist; pass the provisioning workspace or its prod_NN folder")
    if any(_is_kit(p) for p in root.iterdir() if p.is_dir()):
        return root
    prods = sorted((p for p in list(root.glob("prod_*")) + list(root.glob("*/prod_*")) if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not prods:
        raise KitError(f"no startup kits under {root}: expected <participant>/startup/ folders or a prod_NN folder "
                       "(run nvflare provision -p project.yml -w <workspace> first)")
    return prods[-1]


def find_kits(root: str | Path) -> list[Kit]:
    """Every kit of a system (server first, then sites by name, then admins)."""
    prod = latest_prod_dir(root)
    kits = [read_kit(p) for p in sorted(prod.iterdir()) if p.is_dir() and _is_kit(p)]
    order = {"server": 0, "client": 1, "admin": 2}
    return sorted(kits, key=lambda k: (order[k.kind], k.name))


def _is_kit(p: Path) -> bool:
    return any((p / "startup" / f).is_file() for f in KIND_FILES.values())


def admin_address(kit: Kit) -> tuple[str, int]:
    """(host, admin port) that an admin kit connects to."""
    admin = kit.config().get("admin", {})
    return str(admin.get("host", "")), int(admin.get("port", 0))


def admin_username(kit: Kit) -> str:
    """The admin's user name as provisioned (``fed_admin.json``; the kit folder's name otherwise)."""
    return str(kit.config().get("admin", {}).get("username") or kit.name)


def _load_cert(path: Path, what: str):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KitError(f"{what} {path} is missing: the startup kit is incomplete; copy the whole kit folder again "
                       "from the provisioning workspace") from None
    except ValueError as e:
        raise KitError(f"{what} {path} is not a PEM certificate ({e}); the kit is damaged: copy it again from the "
                       "provisioning workspace") from None


def _signed_by(cert, issuer) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:  # pragma: no cover - FLARE issues RSA certificates
            key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        return False
    return True


def check_kit(kit: Kit, expect_root: str | Path | None = None, now: _dt.datetime | None = None) -> dict:
    """Check a kit's files and certificate; return {participant, kind, not_after, days_left}.

    ``expect_root``: the system's root CA (e.g. the server kit's ``startup/rootCA.pem``); a kit provisioned for
    another project (another root CA) is refused with a message saying so.
    """
    missing = [p for p in (kit.cert, kit.startup / CERT_FILES[kit.kind][1], kit.root_ca) if not p.is_file()]
    if missing:
        raise KitError(f"startup kit {kit.path} is incomplete: {', '.join(str(p) for p in missing)} missing; copy "
                       "the whole kit folder again from the provisioning workspace")
    cert = _load_cert(kit.cert, "certificate")
    root = _load_cert(kit.root_ca, "root CA")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > not_after:
        raise KitError(f"certificate {kit.cert} of '{kit.name}' expired on {not_after:%Y-%m-%d}: ask the project "
                       "admin for a new startup kit (re-run nvflare provision with the same project.yml and "
                       "workspace, which keeps the root CA, and hand out the new kit)")
    if now < not_before:
        raise KitError(f"certificate {kit.cert} of '{kit.name}' is not valid before {not_before:%Y-%m-%d %H:%M} UTC: "
                       "check this machine's clock")
    if not _signed_by(cert, root):
        raise KitError(f"certificate {kit.cert} was not signed by the kit's own root CA {kit.root_ca}: the kit mixes "
                       "files of two provisionings; copy the whole kit folder again")
    if expect_root is not None:
        system_root = _load_cert(Path(expect_root), "system root CA")
        if not _signed_by(cert, system_root):
            raise KitError(f"startup kit {kit.path} belongs to another FLARE project: its certificate {kit.cert} was "
                           f"not issued by this system's root CA {expect_root}; use the kit provisioned for this "
                           "project")
    return {"participant": kit.name, "kind": kit.kind, "not_after": not_after.isoformat(),
            "days_left": (not_after - now).days}
