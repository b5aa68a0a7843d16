"""Credentials for the roles a benchmark starts itself (every role requires a token: docs/security.md).

The benchmark makes a tokens file of the local stack's callers in its work directory
(alignd.runtime.tokens), configures each role it spawns with it, and calls as the operator (admin).
"""

from __future__ import annotations

from pathlib import Path


def tokens_file(workdir: Path) -> Path:
    from alignd.runtime.tokens import ensure_stack_tokens

    return ensure_stack_tokens(workdir)


def with_auth(cfg: dict, tokens: Path, **limits) -> dict:
    """A copy of a role's configuration checking calls against `tokens`, with server.limits overrides."""
    out = dict(cfg)
    server = dict(out.get("server") or {})
    server["auth"] = {"tokens_file": str(tokens)}
    if limits:
        server["limits"] = {**(server.get("limits") or {}), **limits}
    out["server"] = server
    return out


def operator(tokens: Path):
    """config.RoleClientConfig sending the operator's token (for make_channel)."""
    from alignd.runtime.tokens import operator_credentials

    return operator_credentials(tokens)


def operator_metadata(tokens: Path) -> tuple:
    """Call metadata carrying the operator's token (for raw and aio channels)."""
    from alignd.runtime.auth import read_token_entry

    return (("authorization", f"Bearer {read_token_entry(tokens, 'operator')}"),)
