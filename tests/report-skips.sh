#!/usr/bin/env bash
# Prints the tests that skipped during `make test`, with their reasons, from
# the log that clh-test-skip appends to ($1). A skip is never a pass: this
# summary is the last thing `make test` prints.
set -euo pipefail
log="$1"
if [ ! -s "$log" ]; then
  echo "skipped tests: 0"
  exit 0
fi
count=$(wc -l <"$log")
echo "skipped tests: $count"
sort "$log" | while IFS=$'\t' read -r test reason; do
  echo "  SKIPPED $test: $reason"
done
