"""What every configuration model shares: strict models (unknown keys are errors), the error type, field types."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _cidrs(v: list[str]) -> list[str]:
    for n in v:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise ValueError(f"{n!r} is not a CIDR network") from None
    return v


CIDRList = Annotated[list[str], AfterValidator(_cidrs)]  # network blocks, e.g. ["10.0.0.0/8"]


def expand_path(v: str | None) -> str | None:
    """ "~" and $VARS expanded in a configured path (None stays None)."""
    return None if v is None else os.path.expanduser(os.path.expandvars(v))
