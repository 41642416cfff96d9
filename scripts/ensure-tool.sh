#!/usr/bin/env bash
# ensure-tool.sh COMMAND PACKAGE PURPOSE
# Install the Debian PACKAGE that provides COMMAND when the command is missing and we
# can: root with apt. Otherwise print the one command that would. Never fails the
# caller: what needs the tool says so itself (bubblewrap: the "bwrap" sandbox provider,
# the plain directory provider works without it; wrk: the create benchmark's load
# generator, which falls back to a Python one).
set -u

cmd=$1 package=$2 purpose=$3
command -v "$cmd" >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing $package ($purpose)"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1 ||
     { apt-get update -qq >/dev/null 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "$package is not installed; $purpose needs it. Run: apt-get install -y $package"
exit 0
