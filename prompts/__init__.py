"""The prompt templates (``*.jinja`` in this package) and their one loader.

Every template is rendered through :func:`render` with one Jinja environment: plain text (no HTML
autoescape), strict undefined names, and the ``untrusted`` / ``untrusted_attr`` filters for
retrieved or user text, which must never be able to close or forge the delimiters the templates
put around it. Used by the answer prompt (``server/prompting.py``) and the re-ranker
(``retriever/rerank.py``) alike.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import jinja2

# Text that could open or close one of our delimiters if left as is.
_DELIMITER_RE = re.compile(r"<(?=\s*/?\s*(?:snippet|context|query|conversation|sentence)\b)", re.IGNORECASE)


def untrusted(text: Any) -> str:
    """Neutralise untrusted text: no NUL (the image markers use it), no tag that opens/closes a delimiter."""
    return _DELIMITER_RE.sub("&lt;", str(text).replace("\x00", ""))


def untrusted_attr(text: Any) -> str:
    """``untrusted`` for an attribute value: no double quote, one line."""
    return " ".join(untrusted(text).replace('"', "'").split())


@functools.cache
def load_templates() -> jinja2.Environment:
    """The one Jinja environment over this package's directory (cached per process)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("prompts"))),
        autoescape=False,  # plain-text prompts; untrusted text goes through `untrusted` instead
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters["untrusted"] = untrusted
    env.filters["untrusted_attr"] = untrusted_attr
    return env


def render(name: str, **context: Any) -> str:
    """Render ``prompts/<name>`` with ``context``."""
    return load_templates().get_template(name).render(**context)
