"""Names of knowledge bases and what they map to: the collection and the blob namespace of each."""

from __future__ import annotations

import re

from retriever.errors import InvalidInput
from server.settings import Settings

DEFAULT_KB = "default"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")


def check_name(name: str) -> str:
    """A KB name: lower-case letters, digits, ``-``/``_``, at most 48 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(f"knowledge base name {name!r} must match {NAME_RE.pattern}", param="kb")
    return name


def collection_for(settings: Settings, name: str) -> str:
    return settings.collection if name == DEFAULT_KB else f"{settings.collection}__kb_{name}"


def blob_namespace(name: str) -> str:
    return "" if name == DEFAULT_KB else f"kbs/{name}/"


def kb_of(settings: Settings) -> str:
    """The KB ``settings_for_kb`` made these settings for (its blob namespace names it), else the default."""
    return settings.blob_namespace.strip("/").rsplit("/", 1)[-1] if settings.blob_namespace else DEFAULT_KB
