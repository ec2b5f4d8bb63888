#!/usr/bin/env bash
# Break the package on purpose, one named mutation at a time, and show which tests catch each.
#   launch/mutation_check.sh [--only WORD] [--list] [--keep]
# Runs outside the default suite (minutes): it copies the repository, applies each mutation to
# the copy and runs the tests named for it there. Exit 0 when every mutation is caught.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$PYTHON" "$root/launch/mutation_check.py" "$@"
