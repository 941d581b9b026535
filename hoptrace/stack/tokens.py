"""The stack's JWTs: issuing them (HS256 with a shared secret, or RS256 with a ``kid``), and
checking them against a given clock.

Expiry is judged against a clock passed in, not pyjwt's ``time.time()``, because the
clock-skew fault needs payment to judge the same token on a clock that runs ahead.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "auth"
_ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["sub", "iat", "exp", "jti", "iss"]


class TokenError(Exception):
    """A token is malformed, badly signed or expired; the message says which."""


class TokenExpired(TokenError):
    """A well-formed, well-signed token whose ``exp`` has passed on the judging clock."""


class KeyRing:
    """auth's RSA signing keys (RS256), each named by a ``kid``: one signs, the published ones verify.

    With ``rotate_after`` > 0 the ring rotates once, after that many tokens, without overlap:
    the next key signs from then on and is the only one published, so every token signed
    with the old key, wherever a client still holds it, stops verifying at once. The keys
    are made up front (an RSA key takes about a second), not on the event loop mid-request.
    """

    def __init__(self, rotate_after: int = 0, name: str = ISSUER) -> None:
        count = 2 if rotate_after > 0 else 1
        self._keys = [(f"{name}-{n}", rsa.generate_private_key(public_exponent=65537, key_size=2048)) for n in range(1, count + 1)]
        self._rotate_after = rotate_after
        self._signed = 0
        self._current = 0

    def sign(self, claims: dict[str, Any]) -> str:
        if self._rotate_after and self._signed == self._rotate_after:
            self._current = 1
        self._signed += 1
        kid, key = self._keys[self._current]
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})

    def public_keys(self) -> dict[str, Any]:
        """The published public keys by kid: only the current one (rotation keeps no overlap)."""
        kid, key = self._keys[self._current]
        return {kid: key.public_key()}

    def jwks(self) -> dict[str, Any]:
        """The published key set, as RFC 7517 JSON."""
        return {"keys": [{**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": kid, "use": "sig", "alg": "RS256"} for kid, key in self.public_keys().items()]}


Signer = str | KeyRing
"""What signs tokens: the HS256 secret, or auth's key ring."""
Verifier = str | Mapping[str, Any]
"""What checks them: the HS256 secret, or RS256 public keys by kid (published, or fetched as a JWKS)."""


def issue_token(signer: Signer, sub: str, ttl: int, now: float, audience: tuple[str, ...] = ()) -> str:
    """A token for ``sub`` valid for ``ttl`` seconds from ``now`` (whole seconds, as JWT has),
    for ``audience`` when given (the ``aud`` claim)."""
    iat = int(now)
    claims: dict[str, Any] = {"sub": sub, "iat": iat, "exp": iat + ttl, "jti": uuid.uuid4().hex, "iss": ISSUER}
    if audience:
        claims["aud"] = list(audience)
    if isinstance(signer, KeyRing):
        return signer.sign(claims)
    return jwt.encode(claims, signer, algorithm=_ALGORITHM)


def keys_of_jwks(body: Any) -> dict[str, Any]:
    """The RS256 public keys of a fetched key set by kid; nothing for what is not one."""
    keys = body.get("keys") if isinstance(body, dict) else None
    found = {}
    for key in keys if isinstance(keys, list) else ():
        try:
            found[key["kid"]] = jwt.PyJWK(key, algorithm="RS256").key
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            continue  # a key this verifier cannot use is one it does not have
    return found


def _verification_key(verifier: Verifier, token: str) -> tuple[Any, str]:
    if isinstance(verifier, str):
        return verifier, _ALGORITHM
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    key = verifier.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError(f"invalid token: signing key {kid!r} is not in the key set")
    return key, "RS256"


def check_token(verifier: Verifier, token: str, now: float) -> dict[str, Any]:
    """The claims of ``token`` if its signature is good and it has not expired at ``now``."""
    key, algorithm = _verification_key(verifier, token)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
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
