#!/usr/bin/env bash
# Print the path of a working Python 3.6 interpreter, or nothing.  pyenv's shim
# for python3.6 exists on PATH even where no 3.6 is selected, so each candidate
# is run before it is trusted.
for candidate in "${PYTHON36:-}" "$(pyenv prefix 3.6.15 2>/dev/null)/bin/python3.6" \
                 "$(command -v python3.6 2>/dev/null)"; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 6)' 2>/dev/null; then
    echo "$candidate"; exit 0
  fi
done
