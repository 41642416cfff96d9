"""Branch names are checked by git's rules without asking git each time: the rules here
agree with ``git check-ref-format`` on every tricky name and on random ones."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.providers.base import PermanentProviderError
from worker.providers.git import _valid_ref, validate_branch_name

TRICKY = [
    "a",
    "feature/x",
    "a..b",
    "a.b",
    ".a",
    "a/.b",
    "a.",
    "a/",
    "/a",
    "a//b",
    "a.lock",
    "a.lock/b",
    "a/b.lock",
    "a.locked",
    "@",
    "a@b",
    "a@{b",
    "@{",
    "a~b",
    "a^b",
    "a:b",
    "a?b",
    "a*b",
    "a[b",
    "a]b",
    "a\\b",
    "a b",
    "a\tb",
    "a\x7fb",
    "ü/ñ",
    "名前",
    "-a",
    "a-",
    "a{b}",
    "..",
    ".",
    "a/..",
    "a/./b",
    "a/.",
    "emoji-🙂",
    "x" * 200,
]


def _git_says(ref: str) -> bool:
    return subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0


@pytest.mark.parametrize("name", TRICKY)
def test_the_rules_agree_with_git_on_tricky_names(name: str) -> None:
    ref = f"refs/heads/{name}"
    assert _valid_ref(ref) == _git_says(ref), ref


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.sampled_from("ab/.@{}~^:?*[\\ \t-_ü\x7f"), min_size=1, max_size=12))
def test_the_rules_agree_with_git_on_random_names(name: str) -> None:
    ref = f"refs/heads/{name}"
    assert _valid_ref(ref) == _git_says(ref), ref


@pytest.mark.parametrize("name", ["", "-x", "HEAD", "a..b", "a\nb", "x" * 201])
def test_a_bad_branch_name_is_refused(name: str) -> None:
    with pytest.raises(PermanentProviderError, match="invalid branch name"):
        validate_branch_name(name)
