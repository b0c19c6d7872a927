"""The simulator's cryptography: the primitives the real protocol uses, so that its errors are real failures.

- Peer sessions: an X25519 agreement, HKDF-SHA256 into a chain key; each message key from the chain key and the
  message counter; AES-256-CBC with an HMAC-SHA256 MAC truncated to 8 bytes (as libsignal's WhisperMessage).
  A desynchronized receiver (its copy of the chain key differs) fails MAC verification: "Bad MAC".
- Retries (`PeerSession.retry`): the receiver's retry receipt carries a fresh key bundle; the sender agrees a new
  session from it and re-sends the same message, which decrypts, unless the receiver's own keys are broken (its
  new session is as wrong as the old one): a transient fault recovers, a truly broken phone loses the message.
- App-state patches: AES-256-CBC under an app-state-sync key, PKCS#7 padded, with an HMAC of the patch.
  A corrupted key makes the unpadding fail, which OpenSSL reports as "bad decrypt"; the rare padding that
  survives is caught by the patch MAC ("Invalid patch mac"), as in Baileys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAC_LENGTH = 8
OPENSSL_BAD_DECRYPT = "error:1C800064:Provider routines::bad decrypt"


class DecryptFailure(Exception):
    """A decryption that failed the way the real stack reports it (the message is the error text)."""


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(secret)


def _aes_cbc(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    operation = cipher.encryptor() if encrypt else cipher.decryptor()
    return operation.update(data) + operation.finalize()


def _pad(data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    return padder.update(data) + padder.finalize()


def _unpad(data: bytes) -> bytes:
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(data) + unpadder.finalize()


@dataclass(frozen=True, slots=True)
class WireMessage:
    counter: int
    ciphertext: bytes
    mac: bytes


class ChainSide:
    """One side's view of a 1:1 session: the chain key and the next counter."""

    def __init__(self, chain_key: bytes) -> None:
        self.chain_key = chain_key
        self.counter = 0

    def _message_keys(self, counter: int) -> tuple[bytes, bytes, bytes]:
        material = _hkdf(self.chain_key, b"WhisperMessageKeys" + counter.to_bytes(4, "big"), 80)
        return material[:32], material[32:64], material[64:80]

    def encrypt(self, plaintext: bytes) -> WireMessage:
        counter = self.counter
        self.counter += 1
        cipher_key, mac_key, iv = self._message_keys(counter)
        ciphertext = _aes_cbc(cipher_key, iv, _pad(plaintext), encrypt=True)
        mac = hmac.new(mac_key, counter.to_bytes(4, "big") + ciphertext, hashlib.sha256).digest()[:MAC_LENGTH]
        return WireMessage(counter, ciphertext, mac)

    def decrypt(self, message: WireMessage) -> bytes:
        cipher_key, mac_key, iv = self._message_keys(message.counter)
        expected = hmac.new(mac_key, message.counter.to_bytes(4, "big") + message.ciphertext, hashlib.sha256)
        if not hmac.compare_digest(expected.digest()[:MAC_LENGTH], message.mac):
            raise DecryptFailure("Bad MAC")
        return _unpad(_aes_cbc(cipher_key, iv, message.ciphertext, encrypt=False))


def new_session() -> tuple[ChainSide, ChainSide]:
    """A fresh 1:1 session: both parties agree on a chain key through X25519 and HKDF."""
    sender, receiver = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    shared = sender.exchange(receiver.public_key())
    assert shared == receiver.exchange(sender.public_key())
    chain_key = _hkdf(shared, b"WhisperRatchet", 32)
    return ChainSide(chain_key), ChainSide(chain_key)


def desynchronize(side: ChainSide) -> None:
    """The fault behind real Bad MACs: this side's session state no longer matches the peer's."""
    side.chain_key = os.urandom(32)


class PeerSession:
    """One peer's session with a phone: messages from the peer, and the retry that re-keys it."""

    def __init__(self) -> None:
        self.sender, self.receiver = new_session()

    def deliver(self, plaintext: bytes) -> bytes:
        """The peer sends, the phone decrypts (DecryptFailure: what the phone's runtime reports)."""
        return self.receiver.decrypt(self.sender.encrypt(plaintext))

    def desynchronize(self) -> None:
        desynchronize(self.receiver)

    def retry(self, plaintext: bytes, receiver_broken: bool = False) -> bytes:
        """The sender answers a retry receipt: a new session from the phone's fresh key bundle, the same message
        again. `receiver_broken`: the phone's own keys are bad, so the new session is desynchronized too."""
        self.sender, self.receiver = new_session()
        if receiver_broken:
            desynchronize(self.receiver)
        return self.deliver(plaintext)


@dataclass(frozen=True, slots=True)
class Patch:
    iv: bytes
    ciphertext: bytes
    mac: bytes


class AppStateKey:
    def __init__(self, key_data: bytes | None = None) -> None:
        self.key_data = key_data or os.urandom(32)
        material = _hkdf(self.key_data, b"WhatsApp Mutation Keys", 64)
        self.cipher_key, self.mac_key = material[:32], material[32:]

    def encrypt(self, mutation: bytes) -> Patch:
        iv = os.urandom(16)
        ciphertext = _aes_cbc(self.cipher_key, iv, _pad(mutation), encrypt=True)
        return Patch(iv, ciphertext, hmac.new(self.mac_key, iv + ciphertext, hashlib.sha256).digest())

    def decrypt(self, patch: Patch) -> bytes:
        plain = _aes_cbc(self.cipher_key, patch.iv, patch.ciphertext, encrypt=False)
        try:
            mutation = _unpad(plain)
        except ValueError:
            raise DecryptFailure(OPENSSL_BAD_DECRYPT) from None
        if not hmac.compare_digest(
            hmac.new(self.mac_key, patch.iv + patch.ciphertext, hashlib.sha256).digest(), patch.mac
        ):
            raise DecryptFailure("Invalid patch mac")
        return mutation


def corrupt(key: AppStateKey) -> AppStateKey:
    """The fault behind app-state 'bad decrypt': a cached key whose bytes no longer match the server's."""
    return AppStateKey(os.urandom(32))
