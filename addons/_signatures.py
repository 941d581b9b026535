"""JWT signatures checked at capture time against the key sets (JWKS) served in the capture.

The recorder reads every JSON response shaped like a JWKS (``{"keys": [{"kty": ...}, ...]}``)
and keeps its public keys; each JWT, when first seen, is verified against the keys
served so far, and only the verdict is stored (``tokens.verdict``):

- ``valid``: the key its ``kid`` names (or, with no ``kid``, one of the keys) verifies it;
- ``invalid``: that key does not verify it (or its signature cannot be read);
- ``unknown_kid``: key sets were served, and none has its ``kid``: signed with a key the
  issuer no longer (or never) published;
- ``unverifiable``: no key set was seen yet in the capture, or the token is HMAC-signed
  (``HS*``: its key is secret, never in a JWKS) or unsigned.

Runs where rows are built (the writer thread or the row process), never on mitmproxy's
event loop: an RS256 check costs ~0.1 ms, once per distinct token. The state is the keys
of the current capture, at most :data:`MAX_KEYS` of them (the oldest forgotten first).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import jwt

from hoptrace.addons._tokens import TokenInfo

MAX_KEYS = 256
# A key set bigger than this is not one an issuer serves: not read.
_MAX_JWKS_BYTES = 256 * 1024


class KeySets:
    """The public keys served in one capture, by ``kid`` (a key without one by its place: ``#0``)."""

    def __init__(self) -> None:
        self.capture_id: int | None = None
        self.seen = False  # a key set was served in this capture (even an empty one)
        self._keys: OrderedDict[str, jwt.PyJWK] = OrderedDict()

    def _for(self, capture_id: int) -> None:
        if capture_id != self.capture_id:
            self.capture_id, self.seen = capture_id, False
            self._keys.clear()

    def learn(self, capture_id: int, text: str | None) -> None:
        """Keep the keys of ``text`` if it is a JWKS; anything else is left alone."""
        if not text or len(text) > _MAX_JWKS_BYTES or '"keys"' not in text:
            return
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            return
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, dict) and "kty" in key for key in keys):
            return
        self._for(capture_id)
        self.seen = True
        for number, key in enumerate(keys):
            kid = key.get("kid")
            try:
                parsed = jwt.PyJWK(key)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key this library cannot use (unknown kty, bad numbers): not one we verify with
            name = kid if isinstance(kid, str) else f"#{number}"
            self._keys[name] = parsed
            self._keys.move_to_end(name)
            while len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)

    def verdict(self, capture_id: int, token: str, info: TokenInfo) -> str | None:
        """One of ``valid``, ``invalid``, ``unknown_kid``, ``unverifiable`` for a JWT; None for other tokens."""
        if info.kind != "jwt":
            return None
        self._for(capture_id)
        alg = info.alg
        if not self.seen or not alg or alg.lower() == "none" or alg.upper().startswith("HS"):
            return "unverifiable"
        if info.kid is not None:
            key = self._keys.get(info.kid)
            if key is None:
                return "unknown_kid"
            candidates = [key]
        else:
            candidates = list(self._keys.values())
        return _check(token, alg, candidates)


def _check(token: str, alg: str, keys: list[jwt.PyJWK]) -> str:
    if not keys:
        return "unverifiable"
    for key in keys:
        try:
            # Only the signature: expiry and audience are other findings' business.
            jwt.PyJWS().decode(token, key=key, algorithms=[alg])
            return "valid"
        except jwt.PyJWTError:
            continue
        except (ValueError, TypeError):  # a key of another type than the token's alg
            continue
    return "invalid"


# The key sets of the process that builds rows: one capture at a time.
KEY_SETS = KeySets()

__all__ = ["KEY_SETS", "MAX_KEYS", "KeySets"]
