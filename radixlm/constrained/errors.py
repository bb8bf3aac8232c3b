"""The one error type the constrained-decoding layer raises to its callers."""

from __future__ import annotations


class GrammarError(ValueError):
    """A grammar that cannot be compiled: unsupported feature, invalid spec, timeout, limits.

    Attributes:
        feature: the JSON-schema keyword or limit at fault ("not", "timeout", ...), or None.
    """

    def __init__(self, message: str, feature: str | None = None):
        super().__init__(message)
        self.feature = feature


def unsupported(feature: str, detail: str = "") -> GrammarError:
    """A GrammarError for a schema feature this backend cannot express."""
    suffix = f": {detail}" if detail else ""
    return GrammarError(f"unsupported JSON schema feature '{feature}'{suffix}", feature=feature)
