"""/v1/knowledge-bases: create, list, show, update and delete knowledge bases (admin).

An admin key bound to some KBs sees and updates only those; creating and deleting KBs takes an admin key
bound to every KB (an entry without ``@``). A KB the key is not bound to is a 404, like a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter

from retriever.errors import Forbidden, NotFound
from server.api_models import (
    KnowledgeBaseCreate,
    KnowledgeBaseDeleted,
    KnowledgeBaseInfo,
    KnowledgeBaseList,
    KnowledgeBaseUpdate,
)
from server.auth import AdminAuth, Principal
from server.deps import CallerDep, KnowledgeBasesDep, SettingsDep
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
async def delete_knowledge_base(name: str, kbs: KnowledgeBasesDep, caller: CallerDep) -> KnowledgeBaseDeleted:
    _bound(caller, name)
    _unbound(caller)
    return KnowledgeBaseDeleted(**await kbs.delete(name))
