"""/v1/knowledge-bases: create, list, show, update and delete knowledge bases (admin).

An admin key bound to some KBs sees and updates only those; creating and deleting KBs takes an admin key
bound to every KB (an entry without ``@``). A KB the key is not bound to is a 404, like a missing one.
``/v1/knowledge-bases/{name}/optimize`` starts (POST) and shows (GET) an HNSW build of the KB's embedded
store beside the server (server/services/hnsw_builds.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from retriever.errors import Forbidden, NotFound
from server.api_models import (
    HnswBuildInfo,
    IndexInfo,
    KnowledgeBaseCreate,
    KnowledgeBaseDeleted,
    KnowledgeBaseInfo,
    KnowledgeBaseList,
    KnowledgeBaseUpdate,
    OptimizeRequest,
)
from server.auth import AdminAuth, Principal
from server.deps import CallerDep, HnswBuildsDep, KnowledgeBasesDep, SettingsDep
from server.knowledge_bases import DEFAULT_KB, KBSpec

router = APIRouter(tags=["knowledge bases"], dependencies=[AdminAuth])


def _info(spec: KBSpec, alias: str, count: int | None = None) -> KnowledgeBaseInfo:
    model = alias if spec.name == DEFAULT_KB else f"{alias}/{spec.name}"
    return KnowledgeBaseInfo(**spec.public(), model=model, count=count)


def _bound(caller: Principal | None, name: str) -> None:
    if caller is None or not caller.may_use(name):
        raise NotFound(f"no knowledge base {name!r}")


def _unbound(caller: Principal | None) -> None:
    if caller is None or caller.kbs is not None:
        raise Forbidden("creating and deleting knowledge bases needs an admin key bound to every knowledge base")


@router.get("/v1/knowledge-bases", response_model=KnowledgeBaseList)
async def list_knowledge_bases(kbs: KnowledgeBasesDep, caller: CallerDep, settings: SettingsDep) -> KnowledgeBaseList:
    specs = [s for s in await kbs.specs() if caller is not None and caller.may_use(s.name)]
    return KnowledgeBaseList(items=[_info(s, settings.model_alias) for s in specs])


@router.post("/v1/knowledge-bases", response_model=KnowledgeBaseInfo, status_code=201)
async def create_knowledge_base(
    body: KnowledgeBaseCreate, kbs: KnowledgeBasesDep, caller: CallerDep, settings: SettingsDep,
) -> KnowledgeBaseInfo:
    _unbound(caller)
    spec = await kbs.create(KBSpec(name=body.name, display_name=body.display_name, description=body.description,
                                   system_prompt=body.system_prompt,
                                   retrieval=body.retrieval.model_dump(exclude_none=True)))
    return _info(spec, settings.model_alias, 0)


@router.get("/v1/knowledge-bases/{name}", response_model=KnowledgeBaseInfo)
async def get_knowledge_base(name: str, kbs: KnowledgeBasesDep, caller: CallerDep,
                             settings: SettingsDep) -> KnowledgeBaseInfo:
    _bound(caller, name)
    spec = await kbs.spec(name)
    return _info(spec, settings.model_alias, await (await kbs.get(name)).count())


@router.patch("/v1/knowledge-bases/{name}", response_model=KnowledgeBaseInfo)
async def update_knowledge_base(
    name: str, body: KnowledgeBaseUpdate, kbs: KnowledgeBasesDep, caller: CallerDep, settings: SettingsDep,
) -> KnowledgeBaseInfo:
    _bound(caller, name)
    changes = body.model_dump(exclude_unset=True, exclude_none=True, exclude={"retrieval"})  # null: unchanged
    if body.retrieval is not None:
        changes["retrieval"] = body.retrieval.model_dump(exclude_none=True)
    return _info(await kbs.update(name, changes), settings.model_alias)


@router.delete("/v1/knowledge-bases/{name}", response_model=KnowledgeBaseDeleted)
async def delete_knowledge_base(name: str, kbs: KnowledgeBasesDep, caller: CallerDep,
                                builds: HnswBuildsDep) -> KnowledgeBaseDeleted:
    _bound(caller, name)
    _unbound(caller)
    await kbs.spec(name)
    await builds.cancel(name)  # its child would otherwise build a copy of a deleted store
    return KnowledgeBaseDeleted(**await kbs.delete(name))


async def _build_info(name: str, kbs: KnowledgeBasesDep, builds: HnswBuildsDep) -> HnswBuildInfo:
    build = builds.status(name)
    info = HnswBuildInfo(**build.to_dict()) if build is not None else HnswBuildInfo(kb=name, state="idle")
    store = (await kbs.get(name)).store
    if store.local_index_build:
        info.index = IndexInfo(**await store.index_info())
    return info


@router.post("/v1/knowledge-bases/{name}/optimize", response_model=HnswBuildInfo, status_code=202,
             responses={200: {"model": HnswBuildInfo, "description": "Nothing to build (state not_needed)."},
                        409: {"description": "A build of this knowledge base is already running."}})
async def optimize_knowledge_base(
    name: str, kbs: KnowledgeBasesDep, caller: CallerDep, builds: HnswBuildsDep, response: Response,
    body: OptimizeRequest | None = None,
) -> HnswBuildInfo:
    """Build HNSW for the KB's embedded store in a child process, swapping it in when done (202: started)."""
    _bound(caller, name)
    build = await builds.start(name, await kbs.get(name), force=body.force if body is not None else False)
    if build.state != "running":
        response.status_code = 200
    return await _build_info(name, kbs, builds)


@router.get("/v1/knowledge-bases/{name}/optimize", response_model=HnswBuildInfo)
async def optimize_status(name: str, kbs: KnowledgeBasesDep, caller: CallerDep, builds: HnswBuildsDep) -> HnswBuildInfo:
    """The KB's last HNSW build since the server started (``idle``: none) and its store's index now."""
    _bound(caller, name)
    await kbs.spec(name)
    return await _build_info(name, kbs, builds)
