"""docker-compose.yml runs real ``lifecycle`` commands with real settings: every service
built from this project names a CLI subcommand whose options parse, every variable is a
setting, every long-running service has a health check, and Flower needs credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from worker.config import Settings
from worker.ops.cli import app
from worker.ops.monitor import plan_flower

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
EXPECTED = {"postgres", "redis", "migrate", "api", "worker", "beat", "flower"}
# Started only with `--profile s3`: S3-compatible snapshot storage.
S3_PROFILE = {"minio", "minio-bucket"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, dict[str, Any]] = data["services"]
    return result


def ours(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run this project's image."""
    return {name: s for name, s in services.items() if "build" in s}


def test_every_service_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED | S3_PROFILE
    assert set(ours(services)) == EXPECTED - {"postgres", "redis"}
    for name in S3_PROFILE:
        assert services[name]["profiles"] == ["s3"], name
    for name in EXPECTED:
        assert "profiles" not in services[name], name


def test_every_command_is_a_real_subcommand_whose_options_parse(
    services: dict[str, dict[str, Any]],
) -> None:
    subcommands = typer.main.get_command(app).commands
    assert {"up", "demo", "flower", "migrate", "api", "worker", "beat"} <= set(subcommands)
    for name, service in ours(services).items():
        command = service["command"]
        assert isinstance(command, list) and command[0] == "lifecycle", (name, command)
        sub = subcommands.get(command[1])
        assert sub is not None, f"{name}: `lifecycle {command[1]}` is not a subcommand"
        # Parses the options exactly as the CLI would: an unknown option or a bad value raises.
        sub.make_context(command[1], list(command[2:]))


def test_a_wrong_option_would_be_caught() -> None:
    beat_cmd = typer.main.get_command(app).commands["beat"]
    with pytest.raises(Exception, match="No such option"):
        beat_cmd.make_context("beat", ["--no-such-option"])


def test_environment_names_real_settings(services: dict[str, dict[str, Any]]) -> None:
    fields = set(Settings.model_fields)
    for name, service in ours(services).items():
        env = service["environment"]
        for var in env:
            assert var.startswith("LIFECYCLE_"), (name, var)
            assert var.removeprefix("LIFECYCLE_").lower() in fields, (name, var)
        assert env["LIFECYCLE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["LIFECYCLE_DATABASE_URL"]
        assert env["LIFECYCLE_BROKER_URL"].startswith("redis://redis:6379")


def test_health_checks_and_start_order(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name == "migrate":
            assert service["restart"] == "no"  # one-shot
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
            continue
        if name == "minio-bucket":
            assert service["restart"] == "no"  # one-shot
            assert service["depends_on"]["minio"]["condition"] == "service_healthy"
            continue
        assert service["healthcheck"]["test"], name
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_flower_requires_credentials(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert "--unauthenticated-api" not in flower["command"]
    auth = flower["environment"]["LIFECYCLE_FLOWER_BASIC_AUTH"]
    assert auth.startswith("${LIFECYCLE_FLOWER_BASIC_AUTH:?")  # compose refuses to start without
    args = flower["command"]
    address = args[args.index("--address") + 1]
    port = int(args[args.index("--port") + 1])
    plan = plan_flower(port=port, address=address, basic_auth="u:p", unauthenticated_api=False)
    assert plan.authenticated


def test_the_s3_example_names_real_settings(services: dict[str, dict[str, Any]]) -> None:
    """The commented example that points the worker at MinIO: real settings, the bucket
    that minio-bucket creates, the MinIO service's address and credentials."""
    lines = [
        line.strip().removeprefix("# ")
        for line in COMPOSE.read_text().splitlines()
        if line.strip().startswith(("# LIFECYCLE_", "# AWS_"))
    ]
    example = dict(line.split(": ", 1) for line in lines)
    fields = set(Settings.model_fields)
    for var in example:
        if var.startswith("LIFECYCLE_"):
            assert var.removeprefix("LIFECYCLE_").lower() in fields, var
    settings = Settings(
        snapshot_store=example["LIFECYCLE_SNAPSHOT_STORE"],
        s3_endpoint_url=example["LIFECYCLE_S3_ENDPOINT_URL"],
    )
    assert settings.snapshot_store.startswith("s3://lifecycle-snapshots/")
    assert "local/lifecycle-snapshots" in services["minio-bucket"]["entrypoint"][-1]
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert example["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert (
        example["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    )
