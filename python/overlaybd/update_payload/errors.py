"""Payload errors: one class per way a payload can be bad, so tools print one clear line and tests
can tell the cases apart. Every message starts with the payload (or key) it is about."""

from __future__ import annotations


class PayloadError(Exception):
    """A payload (or its key) is unusable; str() is one line naming the file and what is wrong."""


class BadMagic(PayloadError):
    """The file does not start with "CrAU": not an update payload at all (an HTML error page, a raw image)."""


class UnsupportedPayload(PayloadError):
    """A real payload this reader cannot apply (other major version, delta operations)."""


class TruncatedPayload(PayloadError):
    """The file ends before a part the header or manifest promises (interrupted download)."""


class MalformedPayload(PayloadError):
    """The manifest does not parse or is inconsistent (offsets out of range, missing fields)."""


class WrongKey(PayloadError):
    """The signature was not made with the given key (or the key is not an RSA public key)."""


class BadSignature(PayloadError):
    """The signature was made with the given key, but over different bytes: the payload was modified."""


class HashMismatch(PayloadError):
    """An operation's data or the extracted image does not match the hash (or size) the manifest signs."""


class KeyProblem(PayloadError):
    """A key file cannot be used (unreadable, not PEM, not RSA, too small)."""
