#!/usr/bin/env bash
# Regression test for the README's two commands run in a newcomer's order: scripts/demo, then
# scripts/test. The demo used to configure the shared build folder with the tests off, so the
# test command that followed found no tests and passed. Here the real scripts/demo runs on a
# fresh build folder; the folder it leaves must list the tests (ctest --no-tests=error fails
# on none), which is what scripts/test then builds and runs there.
# usage: demo_then_test.sh SOURCE_DIR WORK_DIR
set -euo pipefail
source_dir=$1 work=$2
rm -rf "$work"
cd "$source_dir"
SYNCBATCH_BUILD_DIR="$work" scripts/demo --device cpu --requests 400 --threads 2 --policy every:8
listed=$(ctest --test-dir "$work" -N --no-tests=error | grep -c "Test *#" || true)
echo "tests listed in the folder scripts/demo left: $listed"
((listed > 0))
rm -rf "$work"
