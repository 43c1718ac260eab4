"""The MCP tools' arguments (wire models, no logic): each model's JSON schema is its tool's input schema.

Caps that depend on settings (characters of a query, ``k``, image bytes) are checked by the services,
as for the REST API; these models check shape only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_IMAGE = ("An image as a data: URL (data:image/png;base64,...); an http(s) URL only when the server "
          "fetches remote images (VLMRAG_REMOTE_IMAGES_ENABLED), else it is refused.")
_KB = "Knowledge base name (default: the key's first). See list_knowledge_bases."


class ToolArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchArguments(ToolArguments):
    query: str = Field(description="What to look for, in words.")
    kb: str | None = Field(None, max_length=48, description=_KB)
    k: int | None = Field(None, ge=1, description="At most this many results (default: the knowledge base's).")
    image: str | None = Field(None, description=_IMAGE + " Searched together with the query.")


class FetchArguments(ToolArguments):
    id: str = Field(min_length=1, max_length=200, description="A result id from search: `<kb>:<snippet id>`.")


class ListKnowledgeBasesArguments(ToolArguments):
    pass


class AskArguments(ToolArguments):
    question: str = Field(description="The question, answered from the knowledge base with numbered citations.")
    image: str | None = Field(None, description=_IMAGE + " The question is about it.")
    kb: str | None = Field(None, max_length=48, description=_KB)


# the server's instructions to the assistant (initialize), over HTTP and stdio alike
INSTRUCTIONS = (
    "vlmrag is a multimodal knowledge base (text, images, PDF pages). Use search to find snippets and fetch "
    "to read one in full; ask gets an answer with numbered citations. list_knowledge_bases names the "
    "knowledge bases this key may use."
)


ARGUMENTS: dict[str, type[ToolArguments]] = {
    "search": SearchArguments, "fetch": FetchArguments,
    "list_knowledge_bases": ListKnowledgeBasesArguments, "ask": AskArguments,
}
