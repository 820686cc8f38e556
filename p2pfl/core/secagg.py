"""Secure aggregation's maths (Bonawitz et al., CCS 2017): fixed point, masks, secret shares.

Each sampled peer u sends `y_u = q(w_u/W · Δ_u) + PRG(b_u) + Σ_v ±PRG(s_uv)  (mod 2³²)`:
its update Δ_u (trained model minus the global model it started from) clipped to the
declared range, times its FedAvg share w_u/W, in fixed point; a
self-mask from a seed b_u of its own; and one pairwise mask per other peer v, from
a seed s_uv that only u and v can compute (X25519 on per-round keys, then HKDF),
added by the lower id and subtracted by the higher, so that they cancel in the sum.
Shamir shares of b_u and of u's mask key, sealed to each other peer, let the server
remove the self-masks of the peers that sent (`b_u`) and the pairwise masks of those
that dropped out after the masks were fixed (their key), never both for one peer.

Pure functions of their inputs (randomness comes from the caller or `secrets`):
quantising, the keystream PRG (ChaCha20), key agreement, share sealing, Shamir over
GF(2⁵²¹ − 1), and the unmasking sum. The message flow is `p2pfl.protocol.secagg`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 32  # everything masked lives in Z / 2³²
INT_MAX = 2**31 - 1  # |Σ q(w_u/W · Δ_u)| stays below this, so the signed sum is exact
PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime, above any 32-byte secret
SHARE_BYTES = 66  # a field element, big-endian
KEY_BYTES = 32
NONCE_BYTES = 12
SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce, two shares, the AEAD tag
TAG_BYTES = 16  # a key tag: HMAC-SHA256 under the pair's static key, truncated
MIN_PEERS = 3  # fewer and the sum (with one's own update) reveals the other's update


class KeyPair(NamedTuple):
    """An X25519 pair as raw bytes (32 each)."""

    secret: bytes
    public: bytes


def keypair() -> KeyPair:
    """A fresh X25519 pair from the OS's randomness."""
    sk = X25519PrivateKey.generate()
    return KeyPair(sk.private_bytes_raw(), sk.public_key().public_bytes_raw())


def threshold(n: int) -> int:
    """Shares needed to reconstruct among `n` peers: a strict majority, so that no two
    disjoint sets of answering peers can give the server both secrets of one peer."""
    return n // 2 + 1


def _derive(secret: bytes, public: bytes, label: bytes) -> bytes:
    """A 32-byte key from the X25519 agreement of `secret` with `public`, for `label`."""
    shared = X25519PrivateKey.from_private_bytes(secret).exchange(
        X25519PublicKey.from_public_bytes(public)
    )
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"p2pfl-secagg/" + label).derive(shared)


def pair_seed(secret: bytes, public: bytes, round_: int, u: int, v: int) -> bytes:
    """The mask seed u and v share in `round_` (the same from either side)."""
    lo, hi = sorted((u, v))
    return _derive(secret, public, b"mask/%d/%d/%d" % (round_, lo, hi))


def prg(seed: bytes, n: int) -> np.ndarray:
    """`n` uniform uint32 from `seed`: the ChaCha20 keystream (a 32-byte key, nonce 0)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * n)), dtype="<u4").astype(np.uint32)


def scale_for(range_: float, n: int) -> float:
    """Fixed-point steps per unit for `n` peers: the largest that keeps the sum of their
    quantised shares within ±(2³¹ − 1) when every |Δ| ≤ `range_` (each share is at most
    range·w_u/W, and each rounds by at most half a step)."""
    return float(INT_MAX - n) / range_


class Quantised(NamedTuple):
    """A peer's quantised share of the update sum (mod 2³²) and what had to be clipped."""

    values: np.ndarray  # uint32, round(clip(Δ, ±range)·share·scale) mod 2³²
    out_of_range: int  # coordinates with |Δ| > range (saturated: reported, not hidden)
    max_abs: float  # the largest |Δ| seen


def quantise(delta: np.ndarray, share: float, scale: float, range_: float) -> Quantised:
    """`delta` clipped to ±`range_`, times its FedAvg `share` (w_u / W, W the weight of
    every peer that fixed masks), in fixed point (`scale` steps a unit), mod 2³²."""
    d = np.asarray(delta, np.float64)
    bad = ~np.isfinite(d)  # NaN / Inf: saturated (±range, NaN as 0) and reported
    over = int(np.count_nonzero(bad | (np.abs(d) > range_)))
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    if bad.any():
        d = np.nan_to_num(d, nan=0.0, posinf=range_, neginf=-range_)
    steps = np.rint(np.clip(d, -range_, range_) * (share * scale)).astype(np.int64)
    return Quantised((steps & 0xFFFFFFFF).astype(np.uint32), over, max_abs)


def fixed_point_mean(
    deltas: np.ndarray, weights: np.ndarray, range_: float
) -> tuple[np.ndarray, int]:
    """What unmasking gives when every peer of `deltas` (`[k, d]`) survives: the
    weighted mean of their quantised shares (masks cancel exactly, so the simulator
    skips them), and the coordinates clipped to the range."""
    w = np.asarray(weights, np.float64)
    scale = scale_for(range_, len(w))
    total = np.zeros(deltas.shape[1], np.uint32)
    over = 0
    for delta, weight in zip(deltas, w, strict=True):
        q = quantise(delta, float(weight / w.sum()), scale, range_)
        total += q.values
        over += q.out_of_range
    return dequantise(total, scale, 1.0), over


def dequantise(total: np.ndarray, scale: float, share: float) -> np.ndarray:
    """The weighted mean update from the unmasked sum of the survivors' quantised
    shares (mod 2³²); `share` is Σ w_u / W over those survivors (1 when none dropped)."""
    signed = np.asarray(total, np.uint32).view(np.int32).astype(np.float64)
    return signed / (scale * share)


def masked(
    values: np.ndarray,
    self_seed: bytes,
    mask_secret: bytes,
    others: Mapping[int, bytes],
    me: int,
    round_: int,
) -> np.ndarray:
    """`values` + PRG(b) + Σ ±PRG(s_uv) over `others` (peer id -> mask public key):
    what peer `me` sends. Added where me < v, subtracted where me > v (mod 2³²)."""
    n = len(values)
    out = values.astype(np.uint32) + prg(self_seed, n)
    for v, public in sorted(others.items()):
        mask = prg(pair_seed(mask_secret, public, round_, me, v), n)
        out = out + mask if me < v else out - mask
    return out


def unmask(
    inputs: Mapping[int, np.ndarray],
    self_seeds: Mapping[int, bytes],
    dropped_secrets: Mapping[int, bytes],
    mask_publics: Mapping[int, bytes],
    round_: int,
) -> np.ndarray:
    """Σ q(w_u/W · Δ_u) over the peers in `inputs` (mod 2³²): their masked inputs, less their
    self-masks (`self_seeds`, reconstructed), less the pairwise masks they share with
    the peers that dropped out (`dropped_secrets`: each dropped peer's mask key,
    reconstructed; `mask_publics`: every survivor's mask public key)."""
    ids = sorted(inputs)
    n = len(inputs[ids[0]])
    total = np.zeros(n, np.uint32)
    for u in ids:
        total += np.asarray(inputs[u], np.uint32) - prg(self_seeds[u], n)
    for d, secret in sorted(dropped_secrets.items()):
        for v in ids:  # v added +mask where v < d, -mask where v > d: undo it
            mask = prg(pair_seed(secret, mask_publics[v], round_, d, v), n)
            total = total - mask if v < d else total + mask
    return total


# -- Shamir's secret sharing over GF(2^521 - 1) -----------------------------------------


def split(secret: bytes, holders: Iterable[int], t: int) -> dict[int, bytes]:
    """Shares of `secret` (≤ 64 bytes) for each holder id (evaluated at id + 1): any
    `t` of them reconstruct it, fewer reveal nothing."""
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(t - 1)
    ]
    out = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        out[h] = y.to_bytes(SHARE_BYTES, "big")
    return out


def combine(shares: Mapping[int, bytes], length: int = KEY_BYTES) -> bytes:
    """The secret from shares by holder id (Lagrange at 0); the caller supplies ≥ t."""
    points = [(h + 1, int.from_bytes(s, "big")) for h, s in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not agree on a secret")
    return secret.to_bytes(length, "big")


def seal(secret: bytes, public: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """`plaintext` encrypted and authenticated for the holder of `public`'s pair
    (ChaCha20-Poly1305 under the X25519 agreement); `aad` binds round and ids."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    key = _derive(secret, public, b"share")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def unseal(secret: bytes, public: bytes, aad: bytes, sealed: bytes) -> bytes | None:
    """The plaintext `seal` sealed, or None when it was not sealed for us with `aad`."""
    key = _derive(secret, public, b"share")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        return None


def auth_key(static_secret: bytes, static_public: bytes) -> bytes:
    """The key two peers share from their long-term (CurveZMQ) X25519 keys: only they can
    compute it, the server that relays their messages cannot."""
    return _derive(static_secret, static_public, b"auth")


def key_tag(key: bytes, round_: int, sender: int, c: bytes, s: bytes) -> bytes:
    """What vouches for `sender`'s round keys (c, s) to one other peer: an HMAC under
    their `auth_key`. The server relays it and can neither forge it nor swap the keys."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(b"p2pfl-secagg/keys/%d/%d/" % (round_, sender) + c + s)
    return mac.finalize()[:TAG_BYTES]


def share_aad(round_: int, sender: int, holder: int) -> bytes:
    """What a sealed share is bound to: it opens only as `sender`'s share for `holder`
    in `round_`."""
    return b"p2pfl-secagg/share/%d/%d/%d" % (round_, sender, holder)
