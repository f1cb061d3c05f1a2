"""HTTP basic auth for the run browser: an auth file of hashed passwords, or a token.

The auth file holds one ``USER:scrypt$N$R$P$SALT$HASH`` line per user (SALT and HASH in
base64; blank lines and ``#`` comments are ignored), made with hashlib's scrypt so that a
leaked file gives no password away cheaply. A line is made with::

    python -m asyncsync.service.web.auth alice >> browser-users

(which asks for the password twice, or reads it from standard input when that is not a
terminal). ``ASYNCSYNC_SERVE_TOKEN`` is the other way: any user name with the token as the
password, or ``Authorization: Bearer TOKEN`` for scripts. A check that succeeded is
remembered by a digest of its header, so that a page's dozen image requests do not pay for
a dozen scrypt runs.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

TOKEN_ENV = "ASYNCSYNC_SERVE_TOKEN"
SCHEME = "scrypt"
# scrypt's cost: 16 MiB and some 50 ms per check on one core (OWASP's minimum is N=2^17 with
# r=8 for interactive logins; a remembered success makes the cost paid once per session).
COST_N, COST_R, COST_P = 2**15, 8, 1
_MAX_MEMORY = 128 * COST_R * (COST_N + COST_P + 2) + 1024 * 1024
REMEMBERED = 256  # successful headers kept


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``scrypt$N$R$P$SALT$HASH`` form of ``password``."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=COST_N, r=COST_R, p=COST_P,
                            maxmem=_MAX_MEMORY, dklen=32)
    return "$".join((SCHEME, str(COST_N), str(COST_R), str(COST_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def check_password(password: str, hashed: str) -> bool:
    scheme, n, r, p, salt, digest = hashed.split("$")
    expected = base64.b64decode(digest)
    found = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                           p=int(p), maxmem=128 * int(r) * (int(n) + int(p) + 2) + 2**20,
                           dklen=len(expected))
    return hmac.compare_digest(found, expected)


def _valid_hash(hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) != 6 or parts[0] != SCHEME or not all(x.isdigit() for x in parts[1:4]):
        return False
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**20:
        return False
    try:
        base64.b64decode(parts[4], validate=True)
        return len(base64.b64decode(parts[5], validate=True)) >= 16
    except (binascii.Error, ValueError):
        return False


def read_auth_file(path: Path) -> dict[str, str]:
    """User -> hashed password; ConfigError naming the file and the line at fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        cause = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"--auth-file {path}: cannot read: {cause}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not _valid_hash(hashed):
            raise ConfigError(f"--auth-file {path}: line {number}: expected USER:scrypt$N$R$P"
                              f"$SALT$HASH (make one with python -m asyncsync.service.web.auth "
                              f"USER)")
        users[user] = hashed
    if not users:
        raise ConfigError(f"--auth-file {path}: no users in it")
    return users


@dataclass
class Credentials:
    """Who may read the browser: users of an auth file, and/or a token."""

    users: dict[str, str]
    token: str | None = None

    def __post_init__(self) -> None:
        self._remembered: dict[bytes, str] = {}

    def check(self, header: str | None) -> str | None:
        """The user an ``Authorization`` header proves, or None."""
        if not header:
            return None
        key = hashlib.sha256(header.encode(errors="surrogateescape")).digest()
        known = self._remembered.get(key)
        if known is not None:
            return known
        user = self._check(header)
        if user is not None:
            if len(self._remembered) >= REMEMBERED:
                self._remembered.clear()
            self._remembered[key] = user
        return user

    def _check(self, header: str) -> str | None:
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            ok = self.token is not None and hmac.compare_digest(value.encode(),
                                                                self.token.encode())
            return "token" if ok else None
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        if self.token is not None and hmac.compare_digest(password.encode(),
                                                          self.token.encode()):
            return user or "token"
        hashed = self.users.get(user)
        if hashed is not None and check_password(password, hashed):
            return user
        return None


def credentials_from(auth_file: Path | None, environ: dict[str, str]) -> Credentials | None:
    """The credentials asked for (--auth-file, $ASYNCSYNC_SERVE_TOKEN), None for none."""
    token = environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 16:
        raise ConfigError(f"${TOKEN_ENV}: too short to guess hard (at least 16 characters)")
    users = read_auth_file(auth_file) if auth_file is not None else {}
    if not users and token is None:
        return None
    return Credentials(users, token)


def main(argv: list[str]) -> int:
    """``python -m asyncsync.service.web.auth USER``: print an auth file line."""
    if len(argv) != 1 or ":" in argv[0] or not argv[0].strip():
        print("usage: python -m asyncsync.service.web.auth USER  (no ':' in USER)",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {argv[0]}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("a password of at least 8 characters, please", file=sys.stderr)
        return 2
    print(f"{argv[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
