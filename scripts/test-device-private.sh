#!/usr/bin/env bash
# Run part of the device suite under Python 3.6 in a private venv, from a copy
# of the working tree, so that several people (or helpers) can test at once
# without sharing .venv36 or the in-tree build/ folder.
#   scripts/test-device-private.sh NAME [pytest args...]
set -euo pipefail
name=${1:?usage: $0 NAME [pytest args]}; shift
root=$(cd "$(dirname "$0")/.." && pwd)
py36=$("$root/scripts/find-python36.sh")
venv=/tmp/neurohand-v36-$name
if [ ! -x "$venv/bin/pytest" ]; then
  "$py36" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip==21.3.1 2>/dev/null
  "$venv/bin/pip" install -q -r "$root/scripts/constraints-device.txt" 2>/dev/null
fi
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
tar -C "$root" --exclude='./.venv*' --exclude=./.git --exclude=./build -cf - . | tar -C "$copy" -xf -
"$venv/bin/pip" install -q --no-deps --force-reinstall "$copy" 2>/dev/null
cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
