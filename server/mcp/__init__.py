"""vlmrag as a Model Context Protocol server: the knowledge base as tools for agents and desktop assistants.

* ``protocol.py`` — the tools' argument models (their JSON schemas are the tools' input schemas);
* ``tools.py`` — ``McpTools``: what each tool does, over the app's services (the chat service's search
  and ask, the knowledge bases, ``choose_kb``, the rate limiters), and the per-key tool descriptions;
* ``images.py`` — snippet images as MCP image content, bounded in bytes;
* ``server.py`` — the SDK's low-level server over ``McpTools``, and ``/mcp`` in the app (streamable HTTP,
  stateless, JSON responses; the same keys as the REST API);
* ``stdio.py`` — ``vlmrag mcp``: the same tools over stdio, through a running vlmrag or on the local data dir.
"""
