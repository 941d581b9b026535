"""The stack's HS256 JWTs: issuing them, and checking them against a given clock.

Expiry is judged against a clock passed in, not pyjwt's ``time.time()``, because the
clock-skew fault needs payment to judge the same token on a clock that runs ahead.
"""

from __future__ import annotations

import uuid
from typing import Any

import jwt

ISSUER = "auth"
_ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["sub", "iat", "exp", "jti", "iss"]


class TokenError(Exception):
    """A token is malformed, badly signed or expired; the message says which."""


class TokenExpired(TokenError):
    """A well-formed, well-signed token whose ``exp`` has passed on the judging clock."""


def issue_token(secret: str, sub: str, ttl: int, now: float, audience: tuple[str, ...] = ()) -> str:
    """A token for ``sub`` valid for ``ttl`` seconds from ``now`` (whole seconds, as JWT has),
    for ``audience`` when given (the ``aud`` claim)."""
    iat = int(now)
    claims: dict[str, Any] = {"sub": sub, "iat": iat, "exp": iat + ttl, "jti": uuid.uuid4().hex, "iss": ISSUER}
    if audience:
        claims["aud"] = list(audience)
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def check_token(secret: str, token: str, now: float) -> dict[str, Any]:
    """The claims of ``token`` if its signature is good and it has not expired at ``now``."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[_ALGORITHM],
            issuer=ISSUER,
            # Expiry is checked below on the caller's clock instead of pyjwt's.
            # No service of the stack checks aud (pyjwt would refuse any aud without an expected one).
            options={"require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_aud": False},
        )
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    if claims["exp"] <= now:  # the same boundary pyjwt uses: expired at exp itself
        raise TokenExpired(f"token expired {now - claims['exp']:.3f} s ago")
    return claims


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None if there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unverified_subject(token: str) -> str | None:
    """``sub`` of a token without checking it, for services that trust the gateway."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None
