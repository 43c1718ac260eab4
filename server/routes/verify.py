"""POST /v1/verify: check an answer against snippets (for bots that generate elsewhere), or a logged answer again.

Same tenancy as everywhere: the snippets are looked up in the caller's KB (``kb``), so another KB's
ids are the same 404 as unknown ones; a ``completion_id`` must be an answer this key received.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api_models import VerifyRequest, VerifyResponse
from server.auth import ChatAuth
from server.deps import CallerDep, VerifierDep, use_kb
from server.knowledge_bases.access import choose_kb

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.post("/v1/verify", response_model=VerifyResponse)
async def verify_answer(body: VerifyRequest, verifier: VerifierDep, caller: CallerDep, http: Request) -> VerifyResponse:
    """Split the answer into sentences and check each against the snippets it cites (`[n]`: the n-th id)."""
    kb = use_kb(http, choose_kb(caller, body.kb))
    return await verifier.verify_request(
        body, key_id=caller.key_id if caller is not None else "", kb_name=kb,
        may_use=caller.may_use if caller is not None else (lambda _kb: True),
    )
