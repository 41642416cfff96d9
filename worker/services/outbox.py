"""Transactional outbox: jobs are written with the change that asks for them and
published after commit; the relay publishes whatever is still unpublished."""

from __future__ import annotations

import os
import queue as queue_mod
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from worker.db import statements
from worker.db.models import OutboxRecord
from worker.logging import get_logger, redact_text
from worker.providers.broker import Publisher

log = get_logger(__name__)

CLAIM_SECONDS = statements.CLAIM_SECONDS


OutboxRow = tuple[int, str, dict[str, Any], str | None]  # id, task name, payload, queue


def add(
    db: Session,
    task_name: str,
    kwargs: dict[str, Any],
    *,
    queue: str | None = None,
    claim: bool = True,
    task_id: str | None = None,
) -> OutboxRecord:
    """Record a job in the current transaction. With ``claim`` the caller intends to
    publish it right after commit, so the relay leaves it alone for a while."""
    now = datetime.now(UTC)
    record = OutboxRecord(
        task_name=task_name,
        payload={"kwargs": kwargs, "task_id": task_id or str(uuid.uuid4())},
        queue=queue,
        created_at=now,
        claimed_until=statements.claimed_until(now) if claim else None,
        attempts=0,
    )
    db.add(record)
    return record


@dataclass
class RelayResult:
    published: int = 0
    failed: int = 0


# The records as one array parameter: one statement text whatever their number (prepared
# once), where ``IN (…)`` rendered one placeholder per id, a new statement per count.
# Nothing to synchronize: no session of ours holds these records.
_MARK = (
    update(OutboxRecord)
    .where(OutboxRecord.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
    .execution_options(synchronize_session=False)
)


def _mark(factory: sessionmaker[Session], ids: list[int], **values: Any) -> None:
    """Best effort: a record left unmarked is published again by the relay, and a
    duplicate delivery is harmless (tasks are idempotent)."""
    if not ids:
        return
    try:
        with factory.begin() as db:
            db.execute(_MARK.values(**values), {"ids": ids})
    except Exception as exc:  # the database went away after the publish
        log.warning("outbox.mark_failed", records=len(ids), error=type(exc).__name__)


def _send(
    factory: sessionmaker[Session],
    records: Iterable[OutboxRow],
    publisher: Publisher,
) -> RelayResult:
    """Publish ``records`` and mark them published (or, on a failure, released)."""
    published, result = _publish_records(factory, list(records), publisher)
    _mark(factory, published, published_at=func.now(), claimed_until=None)
    return result


def _publish_records(
    factory: sessionmaker[Session], records: list[OutboxRow], publisher: Publisher
) -> tuple[list[int], RelayResult]:
    """Publish ``records``; the ids the broker took (still to be marked published), and
    the counts. Records it refused are released at once for the relay, with the error.
    In one broker round trip when the publisher can: all or nothing as far as we know,
    and any the broker did take before a failure are delivered twice (harmless)."""
    many = getattr(publisher, "publish_many", None)
    if many is not None and records:
        ids = [r[0] for r in records]
        try:
            many(
                [
                    (task, payload["kwargs"], payload["task_id"], q)
                    for _, task, payload, q in records
                ]
            )
        except Exception as exc:  # the broker refused or is down: keep them for the relay
            _mark(factory, ids, claimed_until=None, last_error=redact_text(str(exc))[:500])
            return [], RelayResult(published=0, failed=len(ids))
        return ids, RelayResult(published=len(ids))
    result = RelayResult()
    published: list[int] = []
    for record_id, task_name, payload, queue in records:
        try:
            publisher(task_name, payload["kwargs"], payload["task_id"], queue)
        except Exception as exc:  # the broker refused or is down: keep it for the relay
            result.failed += 1
            _mark(factory, [record_id], claimed_until=None, last_error=redact_text(str(exc))[:500])
            # One failure means the broker is likely down; stop this batch.
            break
        published.append(record_id)
    result.published = len(published)
    return published, result


def publish_now(
    factory: sessionmaker[Session], records: list[OutboxRecord], publisher: Publisher
) -> RelayResult:
    """Publish records the caller just committed (and claimed)."""
    return _send(factory, [(r.id, r.task_name, r.payload, r.queue) for r in records], publisher)


def publish_rows(
    factory: sessionmaker[Session],
    rows: Iterable[tuple[int, str, dict[str, Any], str | None]],
    publisher: Publisher,
) -> RelayResult:
    """Publish outbox rows the caller just committed (and claimed), given as
    ``(id, task_name, payload, queue)`` tuples: for callers that insert with Core."""
    return _send(factory, rows, publisher)


#: Marks the records ``{"ids": [...]}`` published, in the caller's transaction.
MARK_PUBLISHED = _MARK.values(published_at=func.now(), claimed_until=None)


def publish_rows_unmarked(
    factory: sessionmaker[Session],
    rows: Iterable[OutboxRow],
    publisher: Publisher,
) -> list[int]:
    """:func:`publish_rows` without the marking: the ids the broker took, for a caller
    with a transaction of its own coming anyway to mark them in it
    (:data:`MARK_PUBLISHED`). Until then they stay claimed; left unmarked, the relay
    publishes them again after the claim (a duplicate delivery, which runs skip)."""
    published, _ = _publish_records(factory, list(rows), publisher)
    return published


def mark_published(factory: sessionmaker[Session], ids: list[int]) -> None:
    """Mark published records in a transaction of their own (best effort, as after
    :func:`publish_rows`)."""
    _mark(factory, ids, published_at=func.now(), claimed_until=None)


def reclaim(factory: sessionmaker[Session], ids: list[int], seconds: float) -> None:
    """Keep unpublished records claimed ``seconds`` from now: the relay publishes them
    then (the retry timer of a job that ran in place and is to run again later)."""
    _mark(factory, ids, claimed_until=func.now() + timedelta(seconds=max(seconds, 0.0)))


def relay(
    factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    batch_size: int = 500,
    max_batches: int = 20,
) -> RelayResult:
    """Publish unpublished records, oldest first; mark each published only after the
    broker accepted it. Safe to run concurrently (claims with SKIP LOCKED)."""
    total = RelayResult()
    for _ in range(max_batches):
        with factory.begin() as db:
            ids = (
                select(OutboxRecord.id)
                .where(
                    OutboxRecord.published_at.is_(None),
                    (OutboxRecord.claimed_until.is_(None))
                    | (OutboxRecord.claimed_until < func.now()),
                )
                .order_by(OutboxRecord.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            rows = db.execute(
                update(OutboxRecord)
                .where(OutboxRecord.id.in_(ids))
                .values(
                    claimed_until=func.now() + timedelta(seconds=CLAIM_SECONDS),
                    attempts=OutboxRecord.attempts + 1,
                )
                .returning(
                    OutboxRecord.id,
                    OutboxRecord.task_name,
                    OutboxRecord.payload,
                    OutboxRecord.queue,
                )
            ).all()
        if not rows:
            break
        rows = sorted(rows, key=lambda r: r[0])
        result = _send(factory, [(r[0], r[1], r[2], r[3]) for r in rows], publisher)
        total.published += result.published
        total.failed += result.failed
        if result.failed:
            # Release the rest of the batch at once so the next relay retries them.
            with factory.begin() as db:
                db.execute(
                    update(OutboxRecord)
                    .where(
                        OutboxRecord.id.in_([r[0] for r in rows]),
                        OutboxRecord.published_at.is_(None),
                    )
                    .values(claimed_until=None)
                )
            break
        if len(rows) < batch_size:
            break
    if total.published or total.failed:
        log.info("outbox.relay", published=total.published, failed=total.failed)
    return total


def backlog(db: Session) -> tuple[int, float | None]:
    """(unpublished records, age in seconds of the oldest)."""
    count, oldest = db.execute(
        select(func.count(), func.min(OutboxRecord.created_at)).where(
            OutboxRecord.published_at.is_(None)
        )
    ).one()
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
    return int(count), age


PublisherFactory = Callable[[], Publisher]


class BackgroundPublisher:
    """Publishes committed outbox rows from one daemon thread per process, so a request
    (or a task) returns right after its commit instead of waiting on the broker and on a
    second transaction that marks the row published.

    Rows submitted while the thread is busy are published together: one pipelined
    broker round trip and one ``UPDATE`` marking them all. Nothing is lost when the
    process dies first: the rows stay in the outbox, claimed for ``CLAIM_SECONDS``, and
    the relay publishes them after that."""

    MARK_DELAY = 0.05  # seconds a published row may wait to be marked
    MARK_MAX = 500

    def __init__(
        self,
        factory: Callable[[], sessionmaker[Session]],
        publisher: Publisher,
        *,
        max_batch: int = 500,
    ) -> None:
        self._factory = factory
        self._publisher = publisher
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pid = -1
        self._queue: queue_mod.SimpleQueue[OutboxRow | None] = queue_mod.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._submitted = 0
        self._handled = 0
        self._flushing = 0  # callers waiting in flush(): mark without delay

    def submit(self, rows: Iterable[OutboxRow]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self._lock:
            self._ensure_thread()
            self._submitted += len(rows)
        for row in rows:
            self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far was published (or left to the relay)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            self._flushing += 1
            try:
                while self._handled < target and self._pid == os.getpid():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._done.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued, then stop the thread."""
        with self._lock:
            thread = self._thread if self._pid == os.getpid() else None
        if thread is None:
            return
        self.flush(timeout)
        self._queue.put(None)
        thread.join(timeout)
        with self._lock:
            self._thread = None

    def _ensure_thread(self) -> None:
        # Started lazily and again in a forked child (threads do not survive a fork).
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            if self._pid != os.getpid():
                self._queue = queue_mod.SimpleQueue()
                self._submitted = self._handled = 0
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="outbox-publisher", daemon=True
            )
            self._thread.start()

    def _run(self, q: queue_mod.SimpleQueue[OutboxRow | None]) -> None:
        # Published rows are marked in one UPDATE per MARK_DELAY (or per MARK_MAX rows)
        # rather than per batch: under load a batch is a row or two, and the mark's own
        # transaction cost more than the publish. A mark that never happens (the process
        # died) only means the relay publishes the row again after its claim: a
        # duplicate delivery, which runs skip.
        unmarked: list[int] = []
        mark_at = 0.0
        while True:
            timeout = max(0.0, mark_at - time.monotonic()) if unmarked else None
            try:
                first = q.get(timeout=timeout)
                stop = first is None
            except queue_mod.Empty:  # time to mark what was published
                first, stop = None, False
            rows = [first] if first is not None else []
            while rows and len(rows) < self._max_batch:
                try:
                    item = q.get_nowait()
                except queue_mod.Empty:
                    break
                if item is None:
                    stop = True
                    break
                rows.append(item)
            if rows:
                try:
                    factory = self._factory()
                    done, _ = _publish_records(
                        factory, sorted(rows, key=lambda r: r[0]), self._publisher
                    )
                    if done and not unmarked:
                        mark_at = time.monotonic() + self.MARK_DELAY
                    unmarked += done
                    if len(done) < len(rows):  # the rest were released for the relay
                        self._handled_add(len(rows) - len(done))
                except Exception as exc:  # the rows stay claimed; the relay publishes them
                    log.warning("outbox.background_publish_failed", error=type(exc).__name__)
                    self._handled_add(len(rows))
            if unmarked and (
                stop
                or len(unmarked) >= self.MARK_MAX
                or time.monotonic() >= mark_at
                or self._flushing
            ):
                _mark(self._factory(), unmarked, published_at=func.now(), claimed_until=None)
                self._handled_add(len(unmarked))
                unmarked = []
            if stop:
                return

    def _handled_add(self, n: int) -> None:
        with self._lock:
            self._handled += n
            self._done.notify_all()
