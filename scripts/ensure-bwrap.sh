#!/usr/bin/env bash
# Install bubblewrap (the sandbox provider "bwrap" confines agents' commands with it)
# when it is missing and we can: root with apt. Otherwise print the one command that
# would. Never fails the caller: without bwrap the plain directory provider still works
# (and its commands answer an error saying what to install).
set -u

command -v bwrap >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing bubblewrap (sandboxed commands)"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 ||
     { apt-get update -qq >/dev/null 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "bubblewrap is not installed; sandboxed commands need it. Run: apt-get install -y bubblewrap"
exit 0
