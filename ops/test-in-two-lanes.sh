#!/usr/bin/env bash
# `make test`: the whole suite as two pytest processes at once, so CI's wall time is the longer
# lane rather than the sum (most integration time is waiting on brokers, outages and migrations).
#
#   lane "timed":  the QEMU lab and the fault suite (-m "lab or faults"), one test after another:
#                  they bound real migrations and recoveries in seconds, and two of them at once
#                  (two TCG labs, a lab and a broker outage) would compete for the same two cores;
#   lane "rest":   unit tests and the other integration tests.
#
# Each lane starts its own Kafka and Redis on free loopback ports (tests/*/conftest.py). The rest
# lane streams to the terminal; the timed lane's output follows it, whole. Exit status: the timed
# lane's if it failed, else the rest lane's (pytest's 5, "no tests collected", fails too).
# Why not pytest-xdist's --dist loadgroup: on pytest 9.2 it silently stops grouping
# (pytest-dev/pytest-xdist#1386), which would put fault tests on both workers.
set -uo pipefail
PYTHON="${1:-.venv/bin/python}"
shift || true
COMMON=(-q --durations=15 "$@")
log="$(mktemp -t zhuge-timed-lane.XXXXXX.log)"

"$PYTHON" -m pytest "${COMMON[@]}" -m "not gpu and (lab or faults)" tests >"$log" 2>&1 &
timed=$!
trap 'kill "$timed" 2>/dev/null' INT TERM

echo "== lane rest: unit and integration tests (lane timed, lab and faults, runs beside it: $log)"
"$PYTHON" -m pytest "${COMMON[@]}" -m "not gpu and not lab and not faults" tests
rest_rc=$?
echo "== lane rest: exit $rest_rc; waiting for lane timed"
wait "$timed"
timed_rc=$?
echo "== lane timed: lab and fault tests (exit $timed_rc)"
cat "$log"
rm -f "$log"
if [ "$timed_rc" -ne 0 ]; then exit "$timed_rc"; fi
exit "$rest_rc"
