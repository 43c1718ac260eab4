"""Which knowledge base a request runs against, and whether its caller may use it."""

from __future__ import annotations

from retriever.errors import InvalidInput, NotFound
from server.auth import Principal
from server.knowledge_bases.naming import DEFAULT_KB


def kb_from_model(model: str | None, alias: str) -> str | None:
    """``"vlmrag/pumps"`` → ``"pumps"`` (the KB an unchanged OpenAI client picks by model name); else None."""
    if model and model.startswith(alias + "/"):
        return model[len(alias) + 1:] or None
    return None


def choose_kb(principal: Principal | None, requested: str | None = None, *, model: str | None = None,
              alias: str = "vlmrag") -> str:
    """The KB a request runs against: asked for by name or model id, else the caller's first bound KB.

    A KB the caller is not bound to is ``NotFound``, exactly like one that does not exist: a key never
    learns that another tenant's KB (or snippet) exists.
    """
    by_model = kb_from_model(model, alias)
    if requested and by_model and requested != by_model:
        raise InvalidInput(f"model {model!r} names knowledge base {by_model!r} but kb is {requested!r}",
                           param="kb")
    name = requested or by_model
    bound = principal.kbs if principal is not None else None
    if name is None:
        name = DEFAULT_KB if bound is None or DEFAULT_KB in bound else bound[0]
    if principal is None or not principal.may_use(name):
        raise NotFound(f"no knowledge base {name!r}")
    return name
