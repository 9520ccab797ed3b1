#!/usr/bin/env bash
# One pytest process of `make test`: runs "$@", its output also kept in a file.
#
# A process killed by a signal is a native crash (XLA:CPU segfaulted late in long test
# processes that had reached Linux's vm.max_map_count: tests/conftest.py now frees compiled
# programs before that; a crash is still possible). Only a tail of CI's output is kept, so the
# crash is summarised last: the fatal line, native error lines, and the frames of this
# repository in every thread's Python stack (faulthandler's dump). The process is then run once
# more; a test that fails (exit 1) is never rerun, and a second crash fails the run.
set -u
log=$(mktemp "${TMPDIR:-/tmp}/xds-pytest.XXXXXX")
trap 'rm -f "$log"' EXIT

summarise() {
    local rc=$1
    shift
    echo "=== pytest crashed (exit $rc, signal $(( rc - 128 ))): $*"
    grep -n -E "^F[0-9]{4} |Fatal Python error|Check failed|terminate called|corrupted|double free|free\(\)|Segmentation|Aborted|^(Thread|Current thread) 0x" "$log" | head -40
    echo "--- frames of this repository (most recent call first, per thread):"
    grep -E "^(Thread|Current thread) 0x|  File \"[^\"]*/(tests|xds_jax|serving|sharding|collectives|benchmarks)/" "$log" \
        | grep -v "/.venv/" | head -60
    echo "=== end of crash summary"
}

for attempt in 1 2; do
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -lt 128 ]; then
        [ "$attempt" -eq 2 ] && [ "$rc" -eq 0 ] && echo "(passed on a rerun after a crash)"
        exit "$rc"
    fi
    summarise "$rc" "$@"
    [ "$attempt" -eq 1 ] && echo "=== running the same pytest process once more"
done
exit "$rc"
