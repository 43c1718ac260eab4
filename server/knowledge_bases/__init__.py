"""Named knowledge bases, split by concern (no module here imports ``server.state``):

* ``naming`` — names, the default KB, the collection and blob namespace of each;
* ``catalog`` — the SQL table of KB specs (``KBCatalog``, ``KBSpec``) and the CLI's ``settings_for_kb``;
* ``registry`` — ``KnowledgeBases``: the opened KB of each name, create / update / delete;
* ``access`` — ``choose_kb``: which KB a request runs against and whether its key may use it
  (imports ``server.auth``; not re-exported here, so importing the package pulls no auth in).
"""

from server.knowledge_bases.catalog import KBCatalog, KBSpec, database_url, settings_for_kb
from server.knowledge_bases.naming import (
           DEFAULT_KB,
           NAME_RE,
           blob_namespace,
           check_name,
           collection_for,
           kb_of,
)
from server.knowledge_bases.registry import KnowledgeBases, OpenKB

__all__ = ["DEFAULT_KB", "NAME_RE", "KBCatalog", "KBSpec", "KnowledgeBases", "OpenKB", "blob_namespace",
           "check_name", "collection_for", "database_url", "kb_of", "settings_for_kb"]
