"""Chats of a session: CRUD, transcripts, read markers and stream claims.

Access is the session's (``sessions.get_owned``): whoever may use the session may use its
chats. Errors: unknown session 404 ``Session not found``, foreign 403, unknown chat 404
``Chat not found``, a taken stream claim 409 naming its holder.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response

from api_stub import conditional, fields
from api_stub.deps import AccountDep, BodyDep, DbDep, SettingsDep, transaction
from api_stub.schemas import (
    ChatEnvelope,
    ChatPage,
    ChatWrite,
    ErrorBody,
    MessageEnvelope,
    MessagePage,
    MessageWrite,
    ReadMarker,
    StreamClaimRead,
    StreamClaimWrite,
    StreamRelease,
    etag_of,
)
from worker.db.models import ChatRecord
from worker.errors import InvalidInput, PreconditionFailed
from worker.services import chats, sessions
from worker.services.views import chat_dict, message_dict, stream_dict

router = APIRouter(prefix="/api/sessions/{session_id}/chats", tags=["chats"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 412, 413)
}


def _chat_response(chat: ChatRecord, status_code: int = 200) -> Response:
    return fields.etag_response("chat", chat_dict(chat), status_code=status_code)


@router.get("", response_model=ChatPage, responses=_ERRORS, summary="List chats")
def list_chats(
    session_id: str,
    account: AccountDep,
    db: DbDep,
    limit: Annotated[str | None, Query(description="1-100, default 20")] = None,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> Response:
    """The session's chats, newest first, each with ``unread`` for the caller."""
    record = sessions.get_owned(db, account, session_id)
    views, next_cursor = chats.list_chats(
        db, record, account, limit=fields.limit_param(limit), cursor=cursor
    )
    items = [{**chat_dict(v.chat), "unread": v.unread} for v in views]
    return JSONResponse({"chats": items, "nextCursor": next_cursor})


@router.post(
    "",
    response_model=ChatEnvelope,
    status_code=201,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(ChatWrite),
    summary="Create chat",
)
def create_chat(
    session_id: str, account: AccountDep, db: DbDep, body: BodyDep, settings: SettingsDep
) -> Response:
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        title, model_id = fields.text_field(data, "title"), fields.text_field(data, "modelId")
        chat = chats.create_chat(db, settings, record, title, model_id)
        response = _chat_response(chat, 201)
    return response


@router.get("/{chat_id}", response_model=ChatEnvelope, responses=_ERRORS, summary="Get chat")
def get_chat(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    record = sessions.get_owned(db, account, session_id)
    chat = chats.get_chat(db, record, chat_id)
    return fields.etag_response("chat", chat_dict(chat), if_none_match)


@router.patch(
    "/{chat_id}",
    response_model=ChatEnvelope,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(ChatWrite),
    summary="Rename chat or change its model",
)
def patch_chat(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    body: BodyDep,
    settings: SettingsDep,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        chat = chats.get_chat(db, record, chat_id, lock=True)
        title, model_id = fields.text_field(data, "title"), fields.text_field(data, "modelId")
        if if_match is not None and not conditional.if_match_holds(
            if_match, etag_of(chat_dict(chat))
        ):
            raise PreconditionFailed("Precondition failed: the chat has changed")
        chats.patch_chat(db, settings, chat, title, model_id)
        response = _chat_response(chat)
    return response


@router.delete("/{chat_id}", status_code=204, responses=_ERRORS, summary="Delete chat")
def delete_chat(session_id: str, chat_id: str, account: AccountDep, db: DbDep) -> Response:
    """Deletes the chat with its transcript (409 while its stream claim is live)."""
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        chats.delete_chat(db, chats.get_chat(db, record, chat_id, lock=True))
    return Response(status_code=204)


@router.post("/{chat_id}/read", response_model=ReadMarker, responses=_ERRORS, summary="Mark read")
def mark_read(
    session_id: str, chat_id: str, account: AccountDep, db: DbDep, body: BodyDep
) -> Response:
    """Move the caller's read marker to ``messageId`` (default: the newest message)."""
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        chat = chats.get_chat(db, record, chat_id)
        message_id = data.get("messageId")
        if message_id is not None and (
            isinstance(message_id, bool) or not isinstance(message_id, int)
        ):
            raise InvalidInput("messageId must be an integer", missing_fields=["messageId"])
        marker = chats.mark_read(db, chat, account, message_id)
    return JSONResponse({"chatId": str(chat.id), "lastReadMessageId": marker})


@router.get(
    "/{chat_id}/messages", response_model=MessagePage, responses=_ERRORS, summary="Transcript"
)
def list_messages(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    after: Annotated[str | None, Query(description="nextAfter of the previous page")] = None,
    limit: Annotated[str | None, Query(description="1-500, default 100")] = None,
) -> Response:
    """Messages oldest first; page on with ``after`` = the previous page's ``nextAfter``."""
    if after is not None and not (after.isdigit() and len(after) < 19):
        raise InvalidInput("after must be a message id", missing_fields=["after"])
    record = sessions.get_owned(db, account, session_id)
    chat = chats.get_chat(db, record, chat_id)
    rows, next_after = chats.list_messages(
        db, chat, after=int(after) if after else None, limit=fields.limit_param(limit, 100, 500)
    )
    return JSONResponse({"messages": [message_dict(m) for m in rows], "nextAfter": next_after})


@router.post(
    "/{chat_id}/messages",
    response_model=MessageEnvelope,
    status_code=201,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(MessageWrite),
    summary="Append a message",
)
def append_message(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    body: BodyDep,
    settings: SettingsDep,
) -> Response:
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        chat = chats.get_chat(db, record, chat_id, lock=True)
        role = data.get("role")
        if not isinstance(role, str):
            raise InvalidInput("role is required", missing_fields=["role"])
        parts = data.get("parts")
        encoded = json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")
        parts = chats.validate_parts(settings, parts, len(encoded))
        if "\\u0000" in json.dumps(parts):
            raise InvalidInput("parts must not contain NUL characters", missing_fields=["parts"])
        message = chats.append_message(db, chat, account, role, parts)
        payload = {"message": message_dict(message)}
    return JSONResponse(payload, status_code=201)


@router.get(
    "/{chat_id}/stream",
    response_model=StreamClaimRead,
    responses={**_ERRORS, 204: {"description": "Nothing is streaming"}},
    summary="The chat's live stream claim",
)
def get_stream(session_id: str, chat_id: str, account: AccountDep, db: DbDep) -> Response:
    record = sessions.get_owned(db, account, session_id)
    chat = chats.get_chat(db, record, chat_id)
    if chats.stream_holder(chat) is None:
        return Response(status_code=204)
    return JSONResponse(stream_dict(chat))


@router.post(
    "/{chat_id}/stream",
    response_model=StreamClaimRead,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(StreamClaimWrite),
    summary="Claim (or renew) the chat's stream",
)
def claim_stream(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    body: BodyDep,
    settings: SettingsDep,
) -> Response:
    """Compare-and-set: 409 naming the holder when another live stream has it; the same
    ``streamId`` again renews the claim (the heartbeat)."""
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        chat = chats.get_chat(db, record, chat_id)
        stream_id = chats.validate_stream_id(data.get("streamId"))
        ttl = chats.claim_ttl(settings, data.get("ttlSeconds"))
        chats.claim_stream(db, chat, stream_id, ttl)
        payload = stream_dict(chat)
    return JSONResponse(payload)


@router.delete(
    "/{chat_id}/stream",
    status_code=204,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(StreamRelease),
    summary="Release the chat's stream",
)
def release_stream(
    session_id: str,
    chat_id: str,
    account: AccountDep,
    db: DbDep,
    body: BodyDep,
    stream_id: Annotated[str | None, Query(alias="streamId")] = None,
) -> Response:
    """Releases the claim when ``streamId`` (query or body) holds it; 409 when another
    live stream holds it; 204 also when nothing was held."""
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        chat = chats.get_chat(db, record, chat_id)
        held = stream_id if stream_id is not None else data.get("streamId")
        chats.release_stream(db, chat, chats.validate_stream_id(held))
    return Response(status_code=204)
