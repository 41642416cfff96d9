"""The broker publisher: Celery task messages by name, and kombu's survival of a lost
Redis connection. Nothing here knows the database; :mod:`worker.services.outbox` decides
what to publish and records what was."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from celery.utils.nodenames import anon_nodename

# Placeholders of the per-message values in a cached message (see CeleryPublisher._push).
_ID = "\x00lifecycle:task-id\x00"
_KWARGSREPR = "\x00lifecycle:kwargsrepr\x00"
_BODY = "\x00lifecycle:body\x00"
_TAG = "\x00lifecycle:delivery-tag\x00"
#: The third part of a protocol-2 body: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

#: A message to publish: task name, kwargs, task id, queue.
Job = tuple[str, dict[str, Any], str, str | None]


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
        # (task, queue, reply_to) -> (Redis list, the message split around its slots)
        self._templates: dict[tuple[str, str, str], tuple[str, list[str]]] = {}
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

        On Redis (without task-sent events) each message is what Celery's own protocol
        builder (``amqp.as_task_v2``) makes, wrapped in the envelope kombu's Redis
        transport stores, and all of them are pushed in one pipeline: the same bytes
        ``send_task`` writes (a test compares them) at a small part of its CPU, which
        went mostly to kombu's per-message producer machinery. The builder runs once per
        task, queue and thread; each message fills that serialised template's slots.
        Elsewhere: ``send_task`` in a producer batch. Raises when the broker did not take
        them; some may have been sent anyway, which only means a duplicate delivery."""
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

    @property
    def fast_path(self) -> bool:
        """Whether :meth:`publish_many` pushes the messages straight onto Redis lists (the
        broker is Redis, without task-sent events or compression, JSON-serialised)
        rather than through ``send_task``."""
        return self._can_push()

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
        reply_to = app.thread_oid
        default_queue = app.conf.task_default_queue
        dumps = json.dumps
        with app.producer_or_acquire() as producer:
            pipe = producer.channel.client.pipeline(transaction=False)
            for task_name, kwargs, task_id, queue in jobs:
                qname = queue or default_queue
                template = self._templates.get((task_name, qname, reply_to))
                if template is None:
                    template = self._template(producer, task_name, qname, reply_to)
                key, parts = template
                slots = {
                    _ID: dumps(task_id),
                    _KWARGSREPR: dumps(repr(kwargs)),
                    _BODY: '"'
                    + base64.b64encode(dumps(((), kwargs, _EMBED)).encode("utf-8")).decode("ascii")
                    + '"',
                    _TAG: f'"{uuid.uuid4()}"',
                }
                pipe.lpush(key, "".join(slots.get(part, part) for part in parts))
            pipe.execute()

    def _template(
        self, producer: Any, task_name: str, qname: str, reply_to: str
    ) -> tuple[str, list[str]]:
        """The message of ``task_name`` on ``qname`` as Celery's protocol-2 builder
        (``amqp.as_task_v2``) makes it and kombu's Redis transport stores it, serialised
        once with placeholders for what differs per message (task id, kwargs repr, body,
        delivery tag), split around them; and the list it goes to."""
        amqp = self.app.amqp
        channel = producer.channel
        # As send_task does (kombu caches it per channel): the queue's bindings, which a
        # worker also declares when it starts.
        entity = amqp.queues[qname]
        producer.maybe_declare(entity)
        mode = getattr(entity.exchange, "delivery_mode", None) or 2
        headers, properties, body, _ = amqp.as_task_v2(
            _ID,
            task_name,
            (),
            {},
            reply_to=reply_to,
            origin=self._origin,
            ignore_result=None,
            argsrepr="()",
            kwargsrepr=_KWARGSREPR,
        )
        if body != ((), {}, _EMBED):
            raise RuntimeError(f"unexpected Celery message body {body!r}")
        properties.update(
            delivery_mode=mode,
            delivery_info={"exchange": "", "routing_key": qname},
            priority=0,
            body_encoding="base64",
            delivery_tag=_TAG,
        )
        message = {
            "body": _BODY,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        slots = (_ID, _KWARGSREPR, _BODY, _TAG)
        pattern = "(" + "|".join(re.escape(json.dumps(slot)) for slot in slots) + ")"
        parts = [
            next((slot for slot in slots if json.dumps(slot) == part), part)
            for part in re.split(pattern, json.dumps(message))
        ]
        template = self._templates[(task_name, qname, reply_to)] = (
            channel._q_for_pri(qname, 0),
            parts,
        )
        return template

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise ConnectionError("broker marked unavailable; the outbox relay will publish")

    def _mark_down(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown


def survive_broker_loss() -> None:
    """kombu (5.7) kills the worker when Redis drops while a task runs: the lost
    channel's transport (or its client) is already gone when kombu uses it to restore
    the unacknowledged messages on close, or to acknowledge a task that finished after
    the reconnect, and the ``AttributeError`` escapes as an "Unrecoverable error". Raise
    the connection error it stands for instead, which kombu and Celery handle (log and
    go on). The messages stay in Redis's unacked index and come back after the
    visibility timeout: a duplicate delivery, which the run's claim skips."""
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "_lifecycle_patched", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            logging.getLogger(__name__).warning(
                "a channel of a lost broker connection was used; its unacknowledged "
                "messages are redelivered after the visibility timeout"
            )
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        return original(self, asynchronous=asynchronous)  # type: ignore[no-untyped-call]

    _connparams._lifecycle_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
