"""The one rule for names that become path segments (worker.domain.names)."""

from __future__ import annotations

import pytest

from worker.domain.names import (
    REPO_NAME_MAX_LENGTH,
    SANDBOX_NAME_MAX_LENGTH,
    InvalidName,
    is_path_segment,
    require_path_segment,
)
from worker.providers.base import PermanentProviderError
from worker.providers.local_git import validate_safe_name
from worker.providers.local_sandbox import validate_sandbox_name


@pytest.mark.parametrize("name", ["a", "s-1f2e", "repo.name_1-x", "A" * 100, "9lives", "a.b"])
def test_safe_segments(name: str) -> None:
    assert is_path_segment(name, 100)
    assert require_path_segment(name, "name", 100) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "-flag", "_x", "a..b", "a/b", "a\\b", "a b", "a\n", "é", "a" * 101],
)
def test_unsafe_segments(name: str) -> None:
    assert not is_path_segment(name, 100)
    with pytest.raises(InvalidName, match=r"invalid name .*: use 1-100 letters"):
        require_path_segment(name, "name", 100)


def test_non_strings_are_refused() -> None:
    assert not is_path_segment(None, 100)
    assert not is_path_segment(b"abc", 100)


def test_providers_raise_a_permanent_error_with_the_same_rule() -> None:
    assert validate_safe_name("a" * REPO_NAME_MAX_LENGTH, "repository name")
    with pytest.raises(PermanentProviderError, match=r"invalid repository owner '\.\.': use 1-100"):
        validate_safe_name("..", "repository owner")
    assert validate_sandbox_name("s" * SANDBOX_NAME_MAX_LENGTH)
    with pytest.raises(PermanentProviderError, match="invalid sandbox name 'x/y': use 1-128"):
        validate_sandbox_name("x/y")
    with pytest.raises(PermanentProviderError, match="use 1-128"):
        validate_sandbox_name("s" * (SANDBOX_NAME_MAX_LENGTH + 1))
