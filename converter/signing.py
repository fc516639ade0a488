"""Ed25519 keys and detached signatures for model bundles (stdlib + cryptography only).

The converter signs the exact bytes of `manifest.json`; devices and the server verify them with the
public key they trust. Keys are PEM files: the private key as unencrypted (or password-protected)
PKCS#8, the public key as SubjectPublicKeyInfo. `edge-convert keygen --out KEY` writes both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Sequence, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# cryptography's `serialization` package (PEM and DER for every key type, SSH keys) is imported only
# where a key file is written or an unusual one read: its import costs a cold `edge-classify` about
# 10 ms, and a device's verification needs only `_public_key_from_pem` below.

from .errors import KeyFileError, PublishError, SignatureMismatchError

#: What functions that need a public key accept: the key itself, or the path of its PEM file.
PublicKeyLike = Union[Ed25519PublicKey, str, os.PathLike]
#: What functions that need a private key accept: the key itself, or the path of its PEM file.
PrivateKeyLike = Union[Ed25519PrivateKey, str, os.PathLike]

#: Suffix of the public key written next to a private key by `write_keypair`.
PUBLIC_KEY_SUFFIX = ".pub"
#: Environment variable holding the password of an encrypted private key (CLI only).
KEY_PASSWORD_ENV = "EDGE_CONVERT_KEY_PASSWORD"

_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"
# SubjectPublicKeyInfo of an Ed25519 key, up to the 32 key bytes: SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING (33 bytes, no unused bits) }.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A new random Ed25519 key pair."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def write_keypair(path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair: `path` (private, mode 0600) and `path.pub` (public). Returns both paths.

    Refuses to replace existing files unless `overwrite`: losing a signing key strands every device
    that trusts it.
    """
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + PUBLIC_KEY_SUFFIX)
    if not overwrite:
        for existing in (private_path, public_path):
            if existing.exists():
                raise PublishError(f"{existing} already exists: choose another --out or delete it first")
    if not private_path.parent.is_dir():
        raise PublishError(f"cannot write the key: folder {private_path.parent} does not exist")
    from cryptography.hazmat.primitives import serialization

    private, public = generate_keypair()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_private(private_path, private_pem)
        public_path.write_bytes(public_pem(public))
    except OSError as exc:
        raise PublishError(f"cannot write the key pair at {private_path}: {exc.strerror or exc}") from exc
    return private_path, public_path


def _write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start, so the key is never readable by others."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as a PEM document."""
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short, stable name for a key pair: the first 16 hex digits of sha256(raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


def load_private_key(key: PrivateKeyLike, password: bytes | str | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file (or return `key` if it already is one)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key)
    data = _read_key_file(path, "signing")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path} is a public key; signing needs the private key (the file without .pub)")
    if isinstance(password, str):
        password = password.encode("utf-8")
    from cryptography.hazmat.primitives import serialization

    try:
        loaded = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        if password is None:
            raise KeyFileError(
                f"{path} is encrypted: set {KEY_PASSWORD_ENV} to its password"
            ) from exc
        raise KeyFileError(f"{path} is not encrypted: do not give a password for it") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        reason = "wrong password or " if password is not None else ""
        raise KeyFileError(f"{path} is not a usable PEM private key ({reason}damaged or not PEM)") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} holds a {type(loaded).__name__.lstrip('_')} key; bundles are signed with Ed25519 "
            "keys: make one with `edge-convert keygen --out KEY`"
        )
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (or return `key` if it already is one)."""
    keys = load_public_keys(key)
    if len(keys) > 1:
        raise KeyFileError(f"{key} holds {len(keys)} public keys where one is expected")
    return keys[0]


def load_public_keys(key: PublicKeyLike) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys in a PEM file: one, or several one after the other (a key ring, how a
    device trusts the next publisher key before bundles are signed with it)."""
    if isinstance(key, Ed25519PublicKey):
        return [key]
    if isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("a private key was given where the public key is expected: pass key.public_key()")
    path = Path(key)
    data = _read_key_file(path, "public")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} is a private key; verification needs the public key ({path.name}.pub)")
    blocks = _pem_blocks(data)
    return [_load_one_public_key(path, block) for block in blocks] if len(blocks) > 1 else [_load_one_public_key(path, data)]


def _pem_blocks(data: bytes) -> list[bytes]:
    """The `-----BEGIN ... -----END ...` blocks of a PEM file, each with its own lines."""
    blocks, current = [], None
    for line in data.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(b"-----BEGIN"):
            current = [line]
        elif current is not None:
            current.append(line)
            if stripped.startswith(b"-----END"):
                blocks.append(b"".join(current))
                current = None
    return blocks


def _load_one_public_key(path: Path, data: bytes) -> Ed25519PublicKey:
    simple = _public_key_from_pem(data)
    if simple is not None:
        return simple
    from cryptography.hazmat.primitives import serialization

    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key (damaged or another format)") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(loaded).__name__.lstrip('_')} key, not an Ed25519 public key")
    return loaded


def _public_key_from_pem(data: bytes) -> Ed25519PublicKey | None:
    """The key in a plain Ed25519 public-key PEM (what `write_keypair` writes), else None.

    Such a file is one fixed 44-byte DER structure (RFC 8410), so this needs no PEM parser. Anything
    else (other key types, explanatory text, damage) returns None and goes to cryptography's parser,
    which gives the precise error.
    """
    lines = data.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _PEM_BEGIN or lines[-1].strip() != _PEM_END:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI_PREFIX):])


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{kind} key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{kind} key file {path} is a folder") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {kind} key file {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise KeyFileError(f"{path} is not a PEM key file (no -----BEGIN line)")
    return data


def sign(data: bytes, key: PrivateKeyLike) -> bytes:
    """The detached signature of `data`, base64-encoded with a final newline (the manifest.sig format)."""
    signature = load_private_key(key).sign(data)
    return base64.b64encode(signature) + b"\n"


def verify(data: bytes, signature: bytes, key: PublicKeyLike | Sequence[Ed25519PublicKey]) -> Ed25519PublicKey:
    """Check a detached signature made by `sign` against a key or a key ring; returns the key that made
    it, or raises `SignatureMismatchError`."""
    ring = list(key) if isinstance(key, (list, tuple)) else load_public_keys(key)
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureMismatchError("the signature is not base64: the bundle was damaged") from exc
    if len(raw) != 64:
        raise SignatureMismatchError(f"the signature is {len(raw)} bytes, not 64: the bundle was damaged")
    for public in ring:
        try:
            public.verify(raw, data)
            return public
        except InvalidSignature:
            continue
    which = "key " + key_id(ring[0]) if len(ring) == 1 else "any of the keys " + ", ".join(key_id(k) for k in ring)
    raise SignatureMismatchError(
        f"the manifest signature does not verify with {which}: the bundle was changed after signing or "
        "signed by another key"
    )
