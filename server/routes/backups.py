"""/v1/admin/backup (POST: write an archive into VLMRAG_BACKUP_DIR) and /v1/admin/backups (GET: list them).

Admin keys bound to every knowledge base only (an archive holds every KB's data and the answer log).
The logic is server/services/backups.py.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from retriever.errors import Forbidden
from server.api_models import BackupInfo, BackupList, BackupRequest
from server.auth import AdminAuth, Principal
from server.deps import BackupsDep, CallerDep, StateDep

router = APIRouter(tags=["backups"], dependencies=[AdminAuth])


def _unbound(caller: Principal | None) -> None:
    if caller is None or caller.kbs is not None:
        raise Forbidden("backups need an admin key bound to every knowledge base")


@router.post("/v1/admin/backup", response_model=BackupInfo, status_code=201)
async def create_backup(body: BackupRequest, backups: BackupsDep, caller: CallerDep) -> BackupInfo:
    _unbound(caller)
    return BackupInfo(**await backups.backup_into_dir(kb=body.kb, incremental=body.incremental,
                                                          fmt=body.format))


@router.get("/v1/admin/backups", response_model=BackupList)
async def list_backups(backups: BackupsDep, caller: CallerDep, state: StateDep) -> BackupList:
    _unbound(caller)
    items = [BackupInfo(**item) for item in await asyncio.to_thread(backups.archives)]
    schedule = state.backup_schedule
    return BackupList(items=items, schedule=None if schedule is None else {
        "interval_s": schedule.interval_s, "keep": schedule.keep,
        "last": schedule.last and schedule.last.get("name"), "last_error": schedule.last_error,
    })
