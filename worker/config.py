"""Settings from ``LIFECYCLE_*`` environment variables (one class, read once per process)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from worker.providers.bwrap import CommandLimits

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Every knob of the system. Environment variables are ``LIFECYCLE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    data_dir: Path = Path(".lifecycle")

    repo_host: Literal["local", "github"] = "local"
    # "bwrap": the local trees, with agents' commands confined by bubblewrap;
    # "local": plain directories (no commands can run there).
    sandbox_provider: Literal["local", "bwrap"] = "local"
    # "file": archives under data_dir/snapshots, restorable only on this host (the
    # embedded default). "s3://bucket/prefix": S3-compatible object storage every host
    # reads (credentials and region from boto3's standard AWS chain).
    snapshot_store: str = "file"
    # An S3-compatible service (MinIO...); unset: AWS_ENDPOINT_URL(_S3), else AWS itself.
    s3_endpoint_url: str | None = None
    # Multipart part size: the stream is uploaded a part at a time (S3's minimum: 5 MiB).
    s3_part_size_bytes: int = Field(default=8 * 2**20, ge=5 * 2**20, le=5 * 2**30)
    # "noop": every provider call succeeds at once and does nothing (benchmarks, load
    # tests of the orchestration alone; see worker/providers/noop.py).
    provider_set: Literal["default", "noop"] = "default"
    github_token: SecretStr | None = None
    github_api_url: str = "https://api.github.com"
    # git root for clone URLs; None: derived from github_api_url (see providers/github.py)
    github_git_url: str | None = None
    workspace_owner: str = "recoupable"
    default_branch: str = "main"

    default_model_id: str = "anthropic/claude-sonnet-4"

    idle_timeout_seconds: float = Field(default=30 * 60, gt=0)
    max_lifetime_seconds: float = Field(default=5 * 3600, gt=0)
    hibernate_guard_seconds: float = Field(default=60, ge=0)
    # Operator maxima for the per-session overrides (idleTimeoutSeconds,
    # maxLifetimeSeconds) and for extend: a sandbox never lives longer than
    # max_lifetime_limit_seconds from its start.
    max_idle_timeout_seconds: int = Field(default=24 * 3600, gt=0)
    max_lifetime_limit_seconds: int = Field(default=24 * 3600, gt=0)
    # Stream claims: the TTL a claim gets unless it asks for one, and the longest allowed.
    stream_claim_ttl_seconds: float = Field(default=60, gt=0)
    max_stream_claim_ttl_seconds: float = Field(default=600, gt=0)
    lease_seconds: float = Field(default=15 * 60, gt=0)
    # A run that queues a start (the one a provision chains, or a start kicked while the
    # run worked) runs it in the same delivery when this worker consumes
    # the start's queue, instead of sending it through the broker to wait for a worker
    # (off: every run is a delivery of its own, as tests that step through runs want).
    start_in_place: bool = True
    sweep_interval_seconds: float = Field(default=30, gt=0)
    relay_interval_seconds: float = Field(default=5, gt=0)
    reap_interval_seconds: float = Field(default=60, gt=0)
    sweep_batch_size: int = Field(default=200, gt=0)
    # This worker host's name: its queue is lifecycle.host.<hostname> (default: the
    # machine's host name). Two workers on one machine acting as two hosts need two.
    hostname: str | None = None
    # Worker hosts beat this often; one silent for host_lost_after_seconds is declared
    # lost and its sessions go back to their last snapshot.
    host_heartbeat_seconds: float = Field(default=10, gt=0)
    host_lost_after_seconds: float = Field(default=60, gt=0)
    # Active sandboxes with activity since their last snapshot are snapshotted this often
    # (0: never), which bounds the work a lost host costs.
    checkpoint_interval_seconds: float = Field(default=15 * 60, ge=0)
    snapshot_retention_days: float = Field(default=30, gt=0)

    task_max_retries: int = Field(default=5, ge=0)
    retry_backoff_base_seconds: float = Field(default=1.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=60.0, gt=0)

    idempotency_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    # A request's head (request line and headers together) and its number of header
    # lines; over either the API answers 431 without holding the rest in memory.
    api_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    api_max_header_lines: int = Field(default=100, gt=0)
    # Session creates one API process runs in threads at once (the rest queue in its
    # event loop): enough to overlap database round trips, few enough not to fight
    # over the GIL.
    api_create_threads: int = Field(default=4, gt=0, le=64)
    max_title_length: int = Field(default=200, gt=0)
    # A chat message's encoded parts (the request body limit applies as well).
    max_message_bytes: int = Field(default=60 * 1024, gt=0)

    # Confined commands (bwrap provider; see worker/providers/bwrap.py for what each
    # limit covers and what it does not).
    command_timeout_seconds: float = Field(default=300, gt=0)  # when a command names none
    command_max_timeout_seconds: float = Field(default=3600, gt=0)
    command_cpu_seconds: int = Field(default=3600, gt=0)
    command_memory_bytes: int = Field(default=8 << 30, gt=0)
    command_max_processes: int = Field(default=256, gt=0)
    command_open_files: int = Field(default=1024, gt=0)
    command_file_size_bytes: int = Field(default=1 << 30, gt=0)
    command_output_bytes: int = Field(default=1 << 20, gt=0)
    command_max_stdin_bytes: int = Field(default=32 * 1024, ge=0)
    # A command still "running" this long after its wall time lost its worker: the
    # reap_commands sweep ends it "failed" (worker/services/command_reaper.py).
    command_reap_grace_seconds: float = Field(default=120, gt=0)
    sandbox_disk_bytes: int = Field(default=10 << 30, gt=0)
    sandbox_tmp_bytes: int = Field(default=512 << 20, gt=0)
    sandbox_disk_check_seconds: float = Field(default=5, gt=0)
    # Commands share the host's network namespace (loopback services included!) when on.
    sandbox_network: bool = False
    # Files over the API (GET/PUT …/files/content): the largest file read or written;
    # how long the API waits for the sandbox's host to answer (then 504); how many
    # entries one listing returns.
    file_max_bytes: int = Field(default=8 << 20, gt=0)
    file_op_timeout_seconds: float = Field(default=30, gt=0)
    file_list_max_entries: int = Field(default=10_000, gt=0)
    # Worker as root: each sandbox runs as its own host uid from this range.
    sandbox_uid_base: int = Field(default=2_000_000, gt=0)
    sandbox_uid_count: int = Field(default=1_000_000, gt=0)
    # Where sandbox uids are claimed: one registry for every worker and data directory
    # of the machine, so no two sandboxes on it ever share a uid.
    sandbox_uid_registry: Path = Path("/var/lib/lifecycle/sandbox-uids")

    # Webhooks (issue 16). Private, loopback and link-local targets are refused unless
    # allowed (tests allow loopback). A failed delivery is retried after each of
    # webhook_retry_seconds in turn (about a day in all); an endpoint failing for
    # webhook_disable_after_seconds is disabled.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=10, gt=0)
    webhook_retry_seconds: list[float] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1
    )
    webhook_disable_after_seconds: float = Field(default=24 * 3600, gt=0)
    webhook_sweep_interval_seconds: float = Field(default=5, gt=0)
    # Retention (issue 16): hibernated sessions untouched this long are archived, and
    # archived ones this long after archiving lose their snapshots and sandbox data
    # (None: never). Sessions may override both.
    auto_archive_after_seconds: int | None = Field(default=None, gt=0)
    auto_delete_after_seconds: int | None = Field(default=None, gt=0)
    retention_interval_seconds: float = Field(default=60, gt=0)
    # Quotas (issue 16): per account (the organization for an org session), unless the
    # account has its own (None: no limit).
    max_active_sandboxes: int | None = Field(default=None, ge=0)
    max_sessions: int | None = Field(default=None, ge=0)

    log_level: str = "INFO"
    log_json: bool | None = None  # None: JSON when stderr is not a TTY

    flower_basic_auth: SecretStr | None = None
    # Celery "task-sent" events (Flower then lists a task from the moment it is queued,
    # not from when a worker receives it). Off by default: each one is a second broker
    # write per published task, about a third of what publishing costs.
    task_sent_events: bool = False

    # Tests and chaos drills: a JSON file of provider faults (see worker/providers/faults.py).
    fault_plan: Path | None = None

    @field_validator("snapshot_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value == "file":
            return value
        from worker.providers.s3_snapshots import parse_s3_url

        parse_s3_url(value)  # ValueError: "not an s3://bucket/prefix URL"
        return value

    def command_limits(self, timeout_seconds: float | None = None) -> CommandLimits:
        """The limits of one command (``timeout_seconds`` as asked, else the default)."""
        from worker.providers.bwrap import CommandLimits

        return CommandLimits(
            wall_seconds=timeout_seconds or self.command_timeout_seconds,
            cpu_seconds=self.command_cpu_seconds,
            memory_bytes=self.command_memory_bytes,
            processes=self.command_max_processes,
            open_files=self.command_open_files,
            file_size_bytes=self.command_file_size_bytes,
            output_bytes=self.command_output_bytes,
            disk_bytes=self.sandbox_disk_bytes,
            tmp_bytes=self.sandbox_tmp_bytes,
            disk_check_seconds=self.sandbox_disk_check_seconds,
        )

    @property
    def repos_dir(self) -> Path:
        return self.data_dir / "repos"

    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
