#!/bin/sh
# Fuzzes every parser of untrusted bytes in WalshipFormat with libFuzzer and AddressSanitizer.
#   Tests/fuzz/run.sh SECONDS [libFuzzer options...]
# Builds .build/fuzz/walship-fuzz from the module's sources and FuzzTargets.swift, then runs
# it on the corpus kept in Tests/fuzz/corpus (read only) plus .build/fuzz/corpus, where new
# inputs go. A crash leaves its input in .build/fuzz/crashes/ and exits non-zero;
# reproduce with: .build/fuzz/walship-fuzz .build/fuzz/crashes/<file>
set -eu
seconds=${1:?usage: Tests/fuzz/run.sh SECONDS [libFuzzer options...]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.build/fuzz"
bin="$out/walship-fuzz"
mkdir -p "$out/corpus" "$out/crashes"
stale=$(find "$root/Sources/WalshipFormat" "$root/Tests/fuzz/FuzzTargets.swift" -newer "$bin" 2>/dev/null | head -1 || true)
if [ ! -x "$bin" ] || [ -n "$stale" ]; then
    echo "building $bin (libFuzzer + AddressSanitizer)"
    swiftc -sanitize=fuzzer,address -parse-as-library -O -g -module-name WalshipFuzz -package-name walship \
        "$root"/Sources/WalshipFormat/*.swift "$root/Tests/fuzz/FuzzTargets.swift" -o "$bin"
fi
SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1} \
    "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/crashes/" "$@" "$out/corpus" "$root/Tests/fuzz/corpus"
