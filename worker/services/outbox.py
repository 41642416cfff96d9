"""Transactional outbox: jobs are written with the change that asks for them and
published after commit; the relay publishes whatever is still unpublished."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue as queue_mod
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from celery.utils.nodenames import anon_nodename
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.db.models import OutboxRecord
from worker.logging import get_logger, redact_text

log = get_logger(__name__)

CLAIM_SECONDS = 30.0


Job = tuple[str, dict[str, Any], str, str | None]  # task name, kwargs, task id, queue
OutboxRow = tuple[int, str, dict[str, Any], str | None]  # id, task name, payload, queue


class Publisher(Protocol):
    """Sends one task message; raises when the broker did not accept it."""

    def __call__(
        self, task_name: str, kwargs: dict[str, Any], task_id: str, queue: str | None
    ) -> None: ...


class CeleryPublisher:
    """Publishes by task name through a Celery app, failing fast when the broker is down.

    After a failure it stops trying for ``cooldown`` seconds (the relay will publish), so
    a broker outage costs the API one connect timeout, not one per request."""

    def __init__(self, app: Any, cooldown: float = 2.0) -> None:
        self.app = app
        self.cooldown = cooldown
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()  # the producer of the current thread's batch
        self._pushable: bool | None = None
        self._declared: dict[str, tuple[str, int]] = {}
        self._origin = anon_nodename()

    def __call__(
        self, task_name: str, kwargs: dict[str, Any], task_id: str, queue: str | None
    ) -> None:
        self._check_up()
        try:
            self.app.send_task(
                task_name,
                kwargs=kwargs,
                task_id=task_id,
                queue=queue,
                retry=False,
                producer=getattr(self._local, "producer", None),
                # Given, not derived: Celery's saferepr of the arguments costs a quarter
                # of a publish, and ours are three short strings and an int.
                argsrepr="()",
                kwargsrepr=repr(kwargs),
            )
        except Exception:
            self._mark_down()
            raise

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Send the messages published inside in one broker round trip where the
        transport can (Redis: one pipeline, instead of a new client and two round trips
        per message, task and sent event). Raises on exit when the broker did not take
        them; some may have been sent anyway, which only means a duplicate delivery."""
        self._check_up()
        try:
            with self.app.producer_or_acquire() as producer:
                batch = getattr(producer, "batch", None)  # kombu >= 5.7
                with batch() if batch is not None else contextlib.nullcontext():
                    self._local.producer = producer
                    try:
                        yield
                    finally:
                        self._local.producer = None
        except Exception:
            self._mark_down()
            raise

    def publish_many(self, jobs: Sequence[Job]) -> None:
        """Publish ``jobs`` (task name, kwargs, task id, queue) in one broker round trip.

        On Redis (without task-sent events) each message is built by Celery's own
        protocol builder (``amqp.as_task_v2``), wrapped in the envelope kombu's Redis
        transport stores, and all of them are pushed in one pipeline: the same bytes
        ``send_task`` writes (a test compares them) at about a fifth of its CPU, which
        went mostly to kombu's per-message producer machinery. Elsewhere: ``send_task``
        in a producer batch. Raises when the broker did not take them; some may have been
        sent anyway, which only means a duplicate delivery."""
        self._check_up()
        try:
            if self._can_push():
                self._push(jobs)
                return
            with self.batch():
                for job in jobs:
                    self(*job)
        except Exception:
            self._mark_down()
            raise

    def _can_push(self) -> bool:
        if self._pushable is None:
            conf = self.app.conf
            scheme = str(conf.broker_url or "").split(":", 1)[0]
            self._pushable = (
                scheme in ("redis", "rediss")
                and not conf.task_send_sent_event
                and not conf.task_compression
                and conf.task_serializer == "json"
            )
        return self._pushable

    def _push(self, jobs: Sequence[Job]) -> None:
        app = self.app
        amqp = app.amqp
        reply_to = app.thread_oid
        default_queue = app.conf.task_default_queue
        with app.producer_or_acquire() as producer:
            channel = producer.channel
            pipe = channel.client.pipeline(transaction=False)
            for task_name, kwargs, task_id, queue in jobs:
                qname = queue or default_queue
                declared = self._declared.get(qname)
                if declared is None:
                    # As send_task does (kombu caches it per channel): the queue's
                    # bindings, which a worker also declares when it starts.
                    entity = amqp.queues[qname]
                    producer.maybe_declare(entity)
                    mode = getattr(entity.exchange, "delivery_mode", None) or 2
                    declared = self._declared[qname] = (channel._q_for_pri(qname, 0), mode)
                key, mode = declared
                headers, properties, body, _ = amqp.as_task_v2(
                    task_id,
                    task_name,
                    (),
                    kwargs,
                    reply_to=reply_to,
                    origin=self._origin,
                    ignore_result=None,
                    argsrepr="()",
                    kwargsrepr=repr(kwargs),
                )
                payload = json.dumps(body).encode("utf-8")
                properties.update(
                    delivery_mode=mode,
                    delivery_info={"exchange": "", "routing_key": qname},
                    priority=0,
                    body_encoding="base64",
                    delivery_tag=str(uuid.uuid4()),
                )
                message = {
                    "body": base64.b64encode(payload).decode("ascii"),
                    "content-encoding": "utf-8",
                    "content-type": "application/json",
                    "headers": headers,
                    "properties": properties,
                }
                pipe.lpush(key, json.dumps(message))
            pipe.execute()

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise ConnectionError("broker marked unavailable; the outbox relay will publish")

    def _mark_down(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown


def add(
    db: Session,
    task_name: str,
    kwargs: dict[str, Any],
    *,
    queue: str | None = None,
    claim: bool = True,
) -> OutboxRecord:
    """Record a job in the current transaction. With ``claim`` the caller intends to
    publish it right after commit, so the relay leaves it alone for a while."""
    now = datetime.now(UTC)
    record = OutboxRecord(
        task_name=task_name,
        payload={"kwargs": kwargs, "task_id": str(uuid.uuid4())},
        queue=queue,
        created_at=now,
        claimed_until=now + timedelta(seconds=CLAIM_SECONDS) if claim else None,
        attempts=0,
    )
    db.add(record)
    return record


@dataclass
class RelayResult:
    published: int = 0
    failed: int = 0


def _mark(factory: sessionmaker[Session], ids: list[int], **values: Any) -> None:
    """Best effort: a record left unmarked is published again by the relay, and a
    duplicate delivery is harmless (tasks are idempotent)."""
    if not ids:
        return
    try:
        with factory.begin() as db:
            db.execute(update(OutboxRecord).where(OutboxRecord.id.in_(ids)).values(**values))
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
