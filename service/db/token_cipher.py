"""OAuth tokens encrypted at rest when `OAUTH_TOKEN_KEY` is set (Fernet, from `cryptography`).

A stored value is `fernet:<token>` once encrypted. A value without the prefix was stored before a
key was set: it is read as it is, and written encrypted the next time (start-up rewrites it, a
refresh writes the new pair). Several comma-separated keys rotate: the first encrypts, any
decrypts.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.errors import RelayError

PREFIX = "fernet:"


class TokenKeyError(RelayError):
    """The stored OAuth tokens are encrypted, and OAUTH_TOKEN_KEY does not open them."""


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


class TokenCipher:
    """Seals and opens token values; `None` in its place (no key) stores them as they are."""

    def __init__(self, keys: Sequence[str]) -> None:
        # imported here: a process without OAUTH_TOKEN_KEY never loads cryptography
        from cryptography.fernet import Fernet, MultiFernet

        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def seal(self, value: str) -> str:
        return PREFIX + self._fernet.encrypt(value.encode()).decode("ascii")

    def open(self, stored: str) -> str:
        from cryptography.fernet import InvalidToken

        if not is_sealed(stored):
            return stored
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise TokenKeyError() from None


def seal(cipher: TokenCipher | None, value: str) -> str:
    return value if cipher is None else cipher.seal(value)


def unseal(cipher: TokenCipher | None, stored: str) -> str:
    if cipher is not None:
        return cipher.open(stored)
    if is_sealed(stored):
        raise TokenKeyError("the stored OAuth tokens are encrypted: set OAUTH_TOKEN_KEY")
    return stored
