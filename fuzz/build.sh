#!/usr/bin/env bash
# Build the fuzz targets into fuzz/build/ (needs clang and libjpeg-turbo's headers:
#   apt-get install clang llvm libjpeg62-turbo-dev).
#   jpeg8_fuzz      libFuzzer + AddressSanitizer + UndefinedBehaviorSanitizer, against libjpeg
#   jpeg8_cov       the same harness with source coverage (llvm-cov), replays a corpus
#   jpeg8_tsan      fuzz/jpeg8_run.c under ThreadSanitizer: the two-thread split on every file
# No -fwrapv anywhere: signed overflow is undefined behaviour here and UBSan aborts on it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/build"
mkdir -p "$out"
CC=${CC:-clang}
common=(-g -O1 -pthread -fno-omit-frame-pointer)
"$CC" "${common[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  "$here/jpeg8_fuzz.c" -ljpeg -o "$out/jpeg8_fuzz"
"$CC" "${common[@]}" -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
  "$here/jpeg8_fuzz.c" -ljpeg -o "$out/jpeg8_cov"
"$CC" "${common[@]}" -fsanitize=thread "$here/jpeg8_run.c" -o "$out/jpeg8_tsan"
echo "built: $out/jpeg8_fuzz $out/jpeg8_cov $out/jpeg8_tsan"
