"""GET …/commands/{cid}/output: Server-Sent Events over what the worker recorded.

The worker side here is :class:`OutputLog` fed directly (as the runtime's ``on_output``
feeds it); the reader is the real API route. With a real worker process and bubblewrap:
tests/e2e/test_sandbox_io_e2e.py.
"""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.commands import activate
from tests.support.factories import Caller, make_caller
from tests.support.rows import sql, sql_exec
from tests.support.sse import parse_sse
from worker.db.engine import get_sessionmaker
from worker.services.command_output import OutputLog, _complete_utf8


def _command(client: TestClient, caller: Caller) -> tuple[str, str]:
    sid = create(client, caller)["session"]["id"]
    activate(sid)
    r = client.post(f"/api/sessions/{sid}/commands", headers=caller.headers, json={"cmd": "x"})
    cid = r.json()["command"]["id"]
    sql_exec("UPDATE commands SET status = 'running', started_at = now() WHERE id = :id", id=cid)
    return sid, cid


def _finish(cid: str) -> None:
    sql_exec(
        "UPDATE commands SET status = 'exited', exit_code = 0, finished_at = now() WHERE id = :id",
        id=cid,
    )


def test_pieces_never_end_inside_a_character() -> None:
    euro = "€".encode()  # 3 bytes
    assert _complete_utf8(b"ab" + euro[:1]) == 2
    assert _complete_utf8(b"ab" + euro[:2]) == 2
    assert _complete_utf8(b"ab" + euro) == 5
    assert _complete_utf8(b"ab\xff") == 3  # invalid bytes are not held back
    assert _complete_utf8("😀".encode()[:3]) == 0


def test_stream_in_order_with_byte_offsets_resume_and_exit(
    client: TestClient, caller: Caller
) -> None:
    sid, cid = _command(client, caller)
    log = OutputLog(get_sessionmaker(), uuid.UUID(cid), limit_per_stream=1000)
    euro = "€".encode()
    log.feed("stdout", b"one\n" + euro[:1])  # a character split across reads
    log.feed("stderr", b"warn\r\n")
    log.feed("stdout", euro[1:] + b" two\n")
    log.flush()
    url = f"/api/sessions/{sid}/commands/{cid}/output"
    # While it runs, GET …/{cid} shows the output so far.
    running = client.get(f"/api/sessions/{sid}/commands/{cid}", headers=caller.headers).json()
    assert running["command"]["stdout"] == "one\n€ two\n"
    assert running["command"]["stderr"] == "warn\r\n"

    log.feed("stdout", b"x" * 2000)  # past the limit: kept up to it
    log.close()
    _finish(cid)
    r = client.get(url, headers=caller.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [(e["event"], e.get("id")) for e in events] == [
        ("stdout", "4"),
        ("stderr", "10"),
        ("stdout", "18"),
        ("stdout", str(18 + 1000 - 12)),  # the rest up to the stream's limit
        ("exit", None),
    ]
    assert events[0]["data"]["text"] == "one\n"
    assert events[1]["data"]["text"] == "warn\r\n"  # CR and LF survive the SSE framing
    assert events[2]["data"]["text"] == "€ two\n"  # whole again
    assert events[3]["data"]["text"] == "x" * (1000 - 12)
    assert events[4]["data"]["status"] == "exited" and events[4]["data"]["exitCode"] == 0

    # Resume after each event id, and from inside a piece: exactly the rest.
    full = "".join(e["data"]["text"] for e in events[:-1]).encode()
    for offset in (0, 4, 10, 12, 18, 500, len(full)):
        again = client.get(url, headers={**caller.headers, "Last-Event-ID": str(offset)})
        rest = parse_sse(again.text)
        assert rest[-1]["event"] == "exit"
        got = b"".join(e["data"]["text"].encode() for e in rest[:-1])
        if offset != 12:  # 12 is inside the €: the rest starts mid-character
            assert got == full[offset:], offset
        ids = [int(e["id"]) for e in rest[:-1]]
        assert ids == sorted(ids) and all(i > offset for i in ids)
    assert sql("SELECT count(*) FROM command_output WHERE command_id = :id", id=cid)[0][0] == 4


def test_bad_last_event_id_and_access(client: TestClient, caller: Caller) -> None:
    sid, cid = _command(client, caller)
    _finish(cid)
    url = f"/api/sessions/{sid}/commands/{cid}/output"
    for bad in ("-1", "abc", "1e3", "9" * 30):
        r = client.get(url, headers={**caller.headers, "Last-Event-ID": bad})
        assert_error(r, 400, case=bad)
    assert_error(client.get(url), 401)
    assert_error(client.get(url, headers=make_caller("Eve").headers), 403)
    other = f"/api/sessions/{sid}/commands/{uuid.uuid4()}/output"
    assert_error(client.get(other, headers=caller.headers), 404)
