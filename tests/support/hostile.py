"""Hostile sandbox content for the security tests: hooks and repository config an agent
could plant in its sandbox, each with a command that would write a marker file outside
the sandbox if git ever ran it (so a test asserts that the marker never appears)."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Every hook git knows of (githooks(5)); each would write the marker.
HOOKS = (
    "applypatch-msg",
    "pre-applypatch",
    "post-applypatch",
    "pre-commit",
    "pre-merge-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "pre-rebase",
    "post-checkout",
    "post-merge",
    "pre-push",
    "pre-receive",
    "update",
    "proc-receive",
    "post-receive",
    "post-update",
    "reference-transaction",
    "push-to-checkout",
    "pre-auto-gc",
    "post-rewrite",
    "sendemail-validate",
    "fsmonitor-watchman",
    "p4-changelist",
    "p4-prepare-changelist",
    "p4-post-changelist",
    "p4-pre-submit",
    "post-index-change",
)


def marker_script(marker: Path, tag: str) -> str:
    """A shell script that appends ``tag`` and its environment to ``marker``."""
    # Records that it ran and with what environment (a secret would show up there).
    return f"#!/bin/sh\n{{ echo {tag}; env; }} >> {marker}\ncat >/dev/null 2>&1 || true\n"


def plant_hooks(git_dir: Path, marker: Path) -> None:
    """Every hook git knows of, each writing to ``marker``."""
    hooks = git_dir / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in HOOKS:
        path = hooks / name
        path.write_text(marker_script(marker, f"hook:{name}"))
        path.chmod(0o755)


def program(work: Path, marker: Path, tag: str) -> str:
    """An executable marker script inside the sandbox, for a config value to name."""
    path = work / f".evil-{tag}.sh"
    path.write_text(marker_script(marker, tag))
    path.chmod(0o755)
    return str(path)


def plant_config(work: Path, marker: Path, key: str) -> None:  # noqa: C901 -- a table of plants
    """Plant one dangerous config key (and what makes git reach for it)."""
    git = work / ".git"
    prog = program(work, marker, key)
    config = git / "config"

    def add(name: str, value: str, file: Path = config) -> None:
        subprocess.run(["git", "config", "--file", str(file), name, value], check=True)

    attributes = work / ".gitattributes"
    if key == "core.fsmonitor":
        add("core.fsmonitor", prog)
    elif key == "diff.external":
        add("diff.external", prog)
    elif key == "textconv":
        add("diff.evil.textconv", prog)
        attributes.write_text("*.txt diff=evil\n")
    elif key == "diff.command":
        add("diff.evil.command", prog)
        attributes.write_text("*.txt diff=evil\n")
    elif key == "filter.clean":
        add("filter.evil.clean", prog)
        add("filter.evil.smudge", prog)
        add("filter.evil.required", "true")
        attributes.write_text("* filter=evil\n")
    elif key == "filter.process":
        add("filter.evil.process", prog)
        attributes.write_text("* filter=evil\n")
    elif key == "core.sshCommand":
        add("core.sshCommand", prog)
        add("remote.origin.url", "ssh://evil.invalid/x.git")
    elif key == "core.pager":
        add("core.pager", prog)
        add("pager.diff", prog)
    elif key == "core.editor":
        add("core.editor", prog)
        add("sequence.editor", prog)
    elif key == "credential.helper":
        add("credential.helper", f"!{prog}")
    elif key == "core.gitProxy":
        add("core.gitProxy", prog)
    elif key == "protocol.ext":
        add("protocol.ext.allow", "always")
        add("remote.origin.url", f"ext::{prog}")
    elif key == "include.path":
        included = work / ".evil.gitconfig"
        add("core.fsmonitor", prog, included)
        add("filter.inc.clean", prog, included)
        attributes.write_text("* filter=inc\n")
        add("include.path", str(included))
    elif key == "includeIf":
        included = work / ".evil-if.gitconfig"
        add("core.fsmonitor", prog, included)
        add("filter.incif.clean", prog, included)
        attributes.write_text("* filter=incif\n")
        add(f"includeIf.gitdir:{git}/.path", str(included))
        add("includeIf.onbranch:**.path", str(included))
    elif key == "core.hooksPath":
        hooks = work / ".evil-hooks"
        hooks.mkdir()
        for name in HOOKS:
            (hooks / name).write_text(marker_script(marker, f"hooksPath:{name}"))
            (hooks / name).chmod(0o755)
        add("core.hooksPath", str(hooks))
    elif key == "core.alternateRefsCommand":
        add("core.alternateRefsCommand", prog)
    elif key == "uploadpack.packObjectsHook":
        add("uploadpack.packObjectsHook", prog)
    else:  # pragma: no cover - a typo in the list below
        raise AssertionError(key)


#: Every dangerous config mechanism :func:`plant_config` knows how to plant.
CONFIG_KEYS = (
    "core.fsmonitor",
    "diff.external",
    "textconv",
    "diff.command",
    "filter.clean",
    "filter.process",
    "core.sshCommand",
    "core.pager",
    "core.editor",
    "credential.helper",
    "core.gitProxy",
    "protocol.ext",
    "include.path",
    "includeIf",
    "core.hooksPath",
    "core.alternateRefsCommand",
    "uploadpack.packObjectsHook",
)
