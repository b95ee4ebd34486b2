#!/usr/bin/env bash
# Coverage-guided fuzzing of the gateway's parsers with AFL++ (through cargo-afl, on stable Rust).
#
#   scripts/fuzz.sh [TARGET|all] [EXECS]
#
# TARGET is one of request, relay, usage, config (default: all); each runs for about EXECS executions
# (default 1000000), starting from fuzz/corpus/TARGET. Installs cargo-afl and builds AFL++ when missing.
# Prints executions, exec/s, crashes and hangs per target; exits 1 if any target crashed or hung.
# Findings stay in fuzz/out/TARGET/default/{crashes,hangs}. With FUZZ_UPDATE_CORPUS=1, the corpus is
# replaced by the minimized union of itself and what the run found (afl-cmin); `scripts/fuzz.sh cmin
# TARGET` does that for the last run without fuzzing again.
set -euo pipefail

cd "$(dirname "$0")/.."
targets=(request relay usage config)
which=${1:-all}
execs=${2:-1000000}
if [[ $which == cmin ]]; then
    # `scripts/fuzz.sh cmin TARGET`: update the corpus from the last run's queue without fuzzing again.
    which=${2:?cmin needs a target}
    only_cmin=1
fi
if [[ $which != all ]]; then
    [[ " ${targets[*]} " == *" $which "* ]] || { echo "unknown target $which (one of: ${targets[*]}, all)" >&2; exit 2; }
    targets=("$which")
fi

if ! cargo afl --version >/dev/null 2>&1; then
    cargo install --locked cargo-afl
fi
# Builds AFL++ for this toolchain once; answers "already built" afterwards.
if ! out=$(cargo afl config --build 2>&1); then
    grep -q 'already built' <<<"$out" || { echo "$out" >&2; exit 1; }
fi

(cd fuzz && nice -n 10 cargo afl build --release --bins)

dict_for() {
    case $1 in
        config) echo fuzz/dict/toml.dict ;;
        *) echo fuzz/dict/json_sse.dict ;;
    esac
}

# Replaces fuzz/corpus/$1 by the smallest set of its files and the run's queue that covers the same
# edges (afl-cmin -e: hit counts ignored, which keeps the committed corpus to a few hundred files).
update_corpus() {
    local t=$1 out_dir=fuzz/out/$1 afl_bin
    afl_bin=$(dirname "$(find ~/.local/share/afl.rs -path '*/afl/bin/afl-fuzz' | head -1)")
    rm -rf "$out_dir/all" "$out_dir/cmin"
    mkdir -p "$out_dir/all"
    cp "fuzz/corpus/$t"/* "$out_dir/default/queue"/id:* "$out_dir/all/"
    AFL_NO_UI=1 AFL_PATH=$afl_bin nice -n 10 "$afl_bin/afl-cmin.bash" -e -i "$out_dir/all" -o "$out_dir/cmin" \
        -- "fuzz/target/release/$t" >"$out_dir/cmin.log" 2>&1
    rm -rf "fuzz/corpus/$t"
    mkdir -p "fuzz/corpus/$t"
    for f in "$out_dir/cmin"/*; do
        cp "$f" "fuzz/corpus/$t/$(sha1sum "$f" | cut -c1-16)"
    done
    echo "  corpus: $(ls "fuzz/corpus/$t" | wc -l) files, $(du -sh "fuzz/corpus/$t" | cut -f1)"
}

stat() { awk -v k="$1" -F' *: *' '$1 == k { print $2 }' "$2"; }

if [[ ${only_cmin:-0} == 1 ]]; then
    update_corpus "$which"
    exit 0
fi

failed=0
printf '%-8s %12s %10s %8s %6s %6s\n' target execs exec/s seconds crash hang
for t in "${targets[@]}"; do
    out_dir=fuzz/out/$t
    rm -rf "$out_dir"
    mkdir -p "$out_dir"
    AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_TRY_AFFINITY=1 \
        AFL_NO_CRASH_README=1 \
        nice -n 10 cargo afl fuzz -i "fuzz/corpus/$t" -o "$out_dir" -x "$(dict_for "$t")" -E "$execs" \
        -- "fuzz/target/release/$t" >"$out_dir/afl.log" 2>&1 || { tail -20 "$out_dir/afl.log" >&2; exit 1; }
    stats=$out_dir/default/fuzzer_stats
    crashes=$(stat saved_crashes "$stats")
    hangs=$(stat saved_hangs "$stats")
    printf '%-8s %12s %10s %8s %6s %6s\n' "$t" "$(stat execs_done "$stats")" "$(stat execs_per_sec "$stats")" \
        "$(stat run_time "$stats")" "$crashes" "$hangs"
    if [[ $crashes != 0 || $hangs != 0 ]]; then
        failed=1
        echo "  findings: $out_dir/default/crashes $out_dir/default/hangs" >&2
    fi
    if [[ ${FUZZ_UPDATE_CORPUS:-0} == 1 ]]; then
        update_corpus "$t"
    fi
done
exit $failed
