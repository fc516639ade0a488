#!/usr/bin/env bash
# Run a differential fuzzing campaign of the fast JPEG decoder against libjpeg-turbo.
#
#   fuzz/campaign.sh 1800          # 30 minutes, one process
#   fuzz/campaign.sh 3600 4        # an hour, four worker processes (libFuzzer -fork)
#
# Builds the targets (fuzz/build.sh) and the seed corpus (fuzz/make_corpus.py) when missing, fuzzes
# with AddressSanitizer + UndefinedBehaviorSanitizer, then replays the grown corpus under
# ThreadSanitizer (the two-thread split) and measures line coverage of preprocessing/_jpeg8.c.
# Writes fuzz/runs/<UTC time>/: fuzz-small.log, fuzz-big.log, tsan.log, coverage.txt, summary.txt. Findings (inputs
# that break the rule in jpeg8_fuzz.c) land in fuzz/findings/; see fuzz/README.md.
set -euo pipefail
seconds=${1:?usage: fuzz/campaign.sh SECONDS [WORKERS]}
workers=${2:-1}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-$root/.venv/bin/python}
cd "$here"
[ -x build/jpeg8_fuzz ] && [ build/jpeg8_fuzz -nt ../preprocessing/_jpeg8.c ] && [ build/jpeg8_fuzz -nt jpeg8_fuzz.c ] \
  || ./build.sh
[ -d corpus-seed ] || "$python" make_corpus.py corpus-seed
run="runs/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p corpus/small corpus/big findings "$run"
# Two corpora: small photos (up to 64 KB, thousands of executions a second) for most of the time,
# and phone-size photos (over 256 KB of data: the two-thread paths) for a fifth of it.
if [ ! -d corpus-seed/small ]; then
  mkdir -p corpus-seed/small corpus-seed/big
  find corpus-seed -maxdepth 1 -type f -size -65k -exec mv {} corpus-seed/small/ \;
  find corpus-seed -maxdepth 1 -type f -exec mv {} corpus-seed/big/ \;
fi
big_seconds=$((seconds / 5))
small_seconds=$((seconds - big_seconds))
flags=(-timeout=20 -rss_limit_mb=4096 -dict=jpeg.dict -artifact_prefix=findings/ -print_final_stats=1 -reload=0)
[ "$workers" -gt 1 ] && flags+=(-fork="$workers" -ignore_crashes=1)
before=$(ls findings | wc -l)
echo "fuzzing for ${seconds}s with $workers worker(s); logs: fuzz/$run/fuzz-*.log"
set +e
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
./build/jpeg8_fuzz "${flags[@]}" -max_total_time="$small_seconds" -max_len=65536 corpus/small corpus-seed/small \
  >"$run/fuzz-small.log" 2>&1
status=$?
./build/jpeg8_fuzz "${flags[@]}" -max_total_time="$big_seconds" -max_len=1200000 corpus/big corpus-seed/big \
  >"$run/fuzz-big.log" 2>&1
status=$((status | $?))
set -e
after=$(ls findings | wc -l)

echo "replaying the corpus under ThreadSanitizer"
tsan_status=0
find corpus corpus-seed -type f -print0 | xargs -0 -n 200 ./build/jpeg8_tsan >/dev/null 2>"$run/tsan.log" || tsan_status=$?
races=$(grep -c "WARNING: ThreadSanitizer" "$run/tsan.log" || true)

echo "measuring coverage of preprocessing/_jpeg8.c"
rm -f "$run"/cov-*.profraw
for part in small big; do
  LLVM_PROFILE_FILE="$run/cov-$part-%p.profraw" ./build/jpeg8_cov -runs=0 -max_len=1200000 corpus/$part corpus-seed/$part \
    >/dev/null 2>&1 || true
done
llvm-profdata merge -sparse "$run"/cov-*.profraw -o "$run/cov.profdata"
rm -f "$run"/cov-*.profraw
llvm-cov report ./build/jpeg8_cov -instr-profile="$run/cov.profdata" ../preprocessing/_jpeg8.c >"$run/coverage.txt"

execs=0
for part in small big; do
  n=$(grep -h "stat::number_of_executed_units" "$run/fuzz-$part.log" | awk '{s += $2} END {print s + 0}')
  [ "$n" = 0 ] && n=$(grep -oE "^#[0-9]+" "$run/fuzz-$part.log" | tail -1 | tr -d '#')
  execs=$((execs + ${n:-0}))
done
last=$(for part in small big; do echo -n "$part: "; grep -E "cov: [0-9]+ ft: [0-9]+" "$run/fuzz-$part.log" | tail -1 \
  | grep -oE "cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+"; done | paste -sd ';')
lines=$(awk '/_jpeg8.c/ {print $10 " of " $8 " lines (" $9 " missed), " $13 " of branches"}' "$run/coverage.txt" | head -1)
{
  echo "campaign: ${seconds}s, $workers worker(s), ended $(date -u +%FT%TZ), libFuzzer exit $status"
  echo "executions: ${execs:-?}"
  echo "libFuzzer: ${last:-?}"
  echo "coverage of _jpeg8.c (llvm-cov): $lines"
  echo "new findings: $((after - before)) (fuzz/findings/)"
  echo "ThreadSanitizer: $races race report(s), exit $tsan_status"
} | tee "$run/summary.txt"
