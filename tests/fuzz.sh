#!/usr/bin/env bash
# make fuzz: builds the cargo-fuzz targets of fuzz/ and runs each for
# FUZZ_SECONDS (default 30) seconds from its committed seeds
# (fuzz/corpus/<target>); any crash, failed invariant, leak or input that
# hangs fails it, leaving the input under fuzz/artifacts/<target>/.
#
# cargo-fuzz needs rustc's unstable sanitizer flags: RUSTC_BOOTSTRAP=1 lets
# the default stable toolchain take them (it ships the ASan runtime), so no
# nightly is needed. FUZZ_TARGETS picks some targets (space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
read -r -a targets <<<"${FUZZ_TARGETS:-oci_spec_to_guest agent_request sizing_annotations vsock_handshake_reply}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing: run make deps (packaging/install-deps.sh installs it)" >&2
  exit 1
fi

# Release optimisations with debug assertions and overflow checks (-a): an
# overflow the release agent would silently wrap is a crash here.
start=$(date +%s)
if ((${#targets[@]} == 1)); then
  cargo fuzz build -O -a "${targets[0]}"
else
  cargo fuzz build -O -a
fi
echo "fuzz: built ${#targets[@]} target(s) in $(( $(date +%s) - start ))s"

bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
failed=()
for t in "${targets[@]}"; do
  # New inputs go to a scratch corpus under fuzz/target, not into the
  # committed seeds.
  work=fuzz/target/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$work" "$artifacts"
  log=fuzz/target/$t.log
  if "$bin_dir/$t" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$work" "fuzz/corpus/$t" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz: $t: ${runs:-?} runs in ${seconds}s, no crash"
  else
    echo "fuzz: $t FAILED; the input is under $artifacts/ (replay: $bin_dir/$t <input>); log tail:" >&2
    tail -n 40 "$log" >&2
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
