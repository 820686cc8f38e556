"""CurveZMQ keys: the files `p2pfl keys` writes, and the `Keyring` one process runs with.

Layout of a keys folder (what a deployment copies: `public/` to every host, one
secret file to its own host only):

    DIR/public/peer-<id>.key          DIR/private/peer-<id>.key_secret
    DIR/public/coordinator.key        DIR/private/coordinator.key_secret

The files are ZeroMQ's own certificate format (`zmq.auth.create_certificates`); a
secret file holds its public key too. Secret files are mode 0600 in a 0700 folder,
and a secret file that others can read is refused, as ssh refuses one.

A node is named by its id: peers 0..n-1, the coordinator n (the id it stamps on what
it sends). A `Keyring` holds the node's own pair and the public key of every node it
connects to or accepts: the allow-list of its bound sockets and the server keys of
its connections, in one map.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

KEY_CHARS = 40  # a Curve25519 key in Z85 text


class KeyFileError(ValueError):
    """A key file is missing, unreadable, malformed, too open, or does not match."""


@dataclass(frozen=True)
class Keyring:
    """The CURVE keys of one process: who it is, its pair, the public keys it knows.

    `known` maps node id -> public key (Z85): a bound socket accepts exactly these
    keys and vouches for each message with the id its key maps to; a connection to
    node j checks that the server holds j's secret key.
    """

    me: int
    public: bytes
    secret: bytes = field(repr=False)
    known: Mapping[int, bytes]

    def server_key(self, node: int) -> bytes:
        """The public key a connection to `node` must find at the other end."""
        try:
            return self.known[node]
        except KeyError:
            raise KeyFileError(f"no public key for node {node} in this keyring") from None


def raw(key: bytes) -> bytes:
    """A Z85 key as its 32 raw bytes (the X25519 key CurveZMQ uses)."""
    return bytes(z85.decode(key))


def node_name(node: int, peers: int) -> str:
    """The file stem of a node's keys: `peer-<id>`, or `coordinator` for id `peers`."""
    return "coordinator" if node == peers else f"peer-{node}"


def public_path(keys: Path, node: int, peers: int) -> Path:
    """Where `node`'s public key lives."""
    return keys / "public" / f"{node_name(node, peers)}.key"


def secret_path(keys: Path, node: int, peers: int) -> Path:
    """Where `node`'s secret key lives."""
    return keys / "private" / f"{node_name(node, peers)}.key_secret"


def _check_key(key: bytes | None, path: Path, what: str) -> bytes:
    if key is None or len(key) != KEY_CHARS:
        raise KeyFileError(f"{path}: no {what} key in it (a {KEY_CHARS}-character Z85 key)")
    try:
        z85.decode(key)
    except (ValueError, KeyError):
        raise KeyFileError(f"{path}: the {what} key is not valid Z85") from None
    return key


def _read(path: Path) -> tuple[bytes | None, bytes | None]:
    if not path.is_file():
        raise KeyFileError(f"{path}: key file does not exist (make keys with `p2pfl keys`)")
    try:
        return zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError, IndexError):
        raise KeyFileError(f"{path}: not a ZeroMQ key file (malformed)") from None


def read_public(path: Path) -> bytes:
    """The public key in a `.key` file."""
    public, _ = _read(path)
    return _check_key(public, path, "public")


def read_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file that only its owner can read."""
    open_to_others = stat.S_IRWXG | stat.S_IRWXO
    if path.is_file() and os.name == "posix" and path.stat().st_mode & open_to_others:
        mode = stat.S_IMODE(path.stat().st_mode)
        raise KeyFileError(
            f"{path}: secret key file is readable by others (mode {mode:04o}); `chmod 600 {path}`"
        )
    public, secret = _read(path)
    public = _check_key(public, path, "public")
    secret = _check_key(secret, path, "secret")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the secret key does not belong to the public key in it")
    return public, secret


def keyring(keys: Path, me: int, peers: int, known: Iterable[int]) -> Keyring:
    """Node `me`'s keyring from a keys folder: its secret file, and the public files of
    the nodes in `known` (only those: a host needs `public/` and its own secret)."""
    public, secret = read_secret(secret_path(keys, me, peers))
    mine = public_path(keys, me, peers)
    if mine.is_file() and read_public(mine) != public:
        raise KeyFileError(f"{mine}: does not match {secret_path(keys, me, peers)}")
    others = {j: read_public(public_path(keys, j, peers)) for j in sorted(set(known)) if j != me}
    return Keyring(me, public, secret, others)


def existing(keys: Path) -> list[Path]:
    """Key files already in a keys folder (what `create` would overwrite)."""
    return sorted(p for d in ("public", "private") for p in (keys / d).glob("*.key*"))


def create(keys: Path, peers: int, force: bool = False) -> list[Path]:
    """Write a fresh keypair for peers 0..peers-1 and the coordinator; returns the files.

    Refuses (FileExistsError) to overwrite keys unless `force`. Secret files are
    written 0600 into a 0700 `private/`.
    """
    if not force and (old := existing(keys)):
        raise FileExistsError(f"{keys} already holds keys ({old[0]}, ...); --force replaces them")
    public, private = keys / "public", keys / "private"
    public.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    private.chmod(0o700)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=keys) as tmp:
        for node in range(peers + 1):
            name = node_name(node, peers)
            pub, sec = zmq.auth.create_certificates(tmp, name)
            os.chmod(sec, 0o600)
            for src, dst in ((pub, public / f"{name}.key"), (sec, private / f"{name}.key_secret")):
                shutil.move(src, dst)
                written.append(dst)
    return written
