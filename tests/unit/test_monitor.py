"""Flower's start-up rules: credentials by default, an open API only on loopback and
only when asked for explicitly."""

from __future__ import annotations

import pytest

from worker.ops.monitor import FlowerConfigError, apply_env, is_loopback, plan_flower


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_addresses(address: str) -> None:
    assert is_loopback(address)


@pytest.mark.parametrize("address", ["", "0.0.0.0", "::", "10.0.0.5", "flower.example.com"])
def test_other_addresses(address: str) -> None:
    assert not is_loopback(address)


def test_credentials_go_to_flower_through_its_environment_not_argv() -> None:
    plan = plan_flower(
        port=5555, address="0.0.0.0", basic_auth="ops:s3cret", unauthenticated_api=False
    )
    assert plan.authenticated
    assert plan.argv == ["flower", "--port=5555", "--address=0.0.0.0"]
    assert "s3cret" not in " ".join(plan.argv)
    env = {"FLOWER_UNAUTHENTICATED_API": "true", "OTHER": "1"}
    apply_env(plan, env)
    assert env == {"FLOWER_BASIC_AUTH": "ops:s3cret", "OTHER": "1"}


def test_credentials_win_over_the_open_api_flag() -> None:
    plan = plan_flower(
        port=5555, address="127.0.0.1", basic_auth="ops:pw", unauthenticated_api=True
    )
    assert plan.authenticated and "FLOWER_UNAUTHENTICATED_API" in plan.unset


def test_no_credentials_needs_the_explicit_flag_even_on_loopback() -> None:
    with pytest.raises(FlowerConfigError, match="LIFECYCLE_FLOWER_BASIC_AUTH"):
        plan_flower(port=5555, address="127.0.0.1", basic_auth=None, unauthenticated_api=False)
    plan = plan_flower(port=5555, address="127.0.0.1", basic_auth=None, unauthenticated_api=True)
    assert not plan.authenticated
    env = {"FLOWER_BASIC_AUTH": "stale:value"}
    apply_env(plan, env)
    assert env == {"FLOWER_UNAUTHENTICATED_API": "true"}


@pytest.mark.parametrize("address", ["0.0.0.0", "", "192.168.1.10"])
def test_refuses_an_open_api_off_loopback(address: str) -> None:
    with pytest.raises(FlowerConfigError, match="refusing"):
        plan_flower(port=5555, address=address, basic_auth=None, unauthenticated_api=True)


@pytest.mark.parametrize("auth", ["nocolon", ":pw", "user:", "a:b,c:d"])
def test_malformed_credentials(auth: str) -> None:
    with pytest.raises(FlowerConfigError):
        plan_flower(port=5555, address="127.0.0.1", basic_auth=auth, unauthenticated_api=False)


def test_credentials_on_the_command_line_are_refused() -> None:
    with pytest.raises(FlowerConfigError, match="not on the command line"):
        plan_flower(
            port=5555,
            address="127.0.0.1",
            basic_auth=None,
            unauthenticated_api=True,
            extra_args=["--basic-auth=a:b"],
        )
