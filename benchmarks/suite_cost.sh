#!/usr/bin/env bash
# What the test suite costs, as CI runs it: `/usr/bin/time -v make test` on a fresh clone (venv install included),
# on a quiet machine or beside a competing load of busy processes. Prints wall and CPU time and appends a row to
# benchmarks/results/suite_cost.csv.
#
#   benchmarks/suite_cost.sh [--load N] [--rev REV] [--label TEXT] [--pytest-args "ARGS"]
#
#   --load N          N `yes > /dev/null` processes run for the whole measurement (the issue-22 load: 2 on 2 cores)
#   --rev REV         the commit to clone (default HEAD; commit first: the clone holds only committed work)
#   --pytest-args A   passed to `make test` as PYTEST_ARGS (default: the Makefile's, "-n 2"; "-n 0" is serial)
#
# Why CPU time: on a shared machine wall time says how busy the machine was; CPU time says what the suite spent,
# and it is what grows when threads spin-wait for cores that other processes hold.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
load=0 rev=HEAD label="" pytest_args="" have_args=0
while [ $# -gt 0 ]; do
    case "$1" in
        --load) load=$2; shift 2 ;;
        --rev) rev=$2; shift 2 ;;
        --label) label=$2; shift 2 ;;
        --pytest-args) pytest_args=$2; have_args=1; shift 2 ;;
        *) echo "suite_cost.sh: unknown argument '$1' (see the usage at the top of this file)" >&2; exit 2 ;;
    esac
done
case "$load" in ''|*[!0-9]*) echo "suite_cost.sh: --load must be a whole number of busy processes, got '$load'" >&2; exit 2 ;; esac
sha=$(git -C "$repo" rev-parse --short "$rev")
work=$(mktemp -d /tmp/sara-edu-suite.XXXXXX)
git clone --quiet "$repo" "$work/main"
git -C "$work/main" checkout --quiet "$sha"

pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq 1 "$load"); do yes > /dev/null & pids+=($!); done

log="$work/time.log"
start_load=$(cut -d' ' -f1 /proc/loadavg)
set +e
# Without --pytest-args the Makefile's own default runs (what CI runs).
if [ "$have_args" = 1 ]; then set -- PYTEST_ARGS="$pytest_args"; else set --; fi
(cd "$work/main" && /usr/bin/time -v -o "$log" make test "$@" > "$work/test.log" 2>&1)
status=$?
set -e
end_load=$(cut -d' ' -f1 /proc/loadavg)
[ "$have_args" = 1 ] || pytest_args="Makefile default: $(sed -n 's/^PYTEST_ARGS ?= *//p' "$work/main/Makefile")"
cleanup
pids=()

field() { grep -F "$1" "$log" | head -n1 | awk -F': ' '{print $2}'; }
user=$(field "User time (seconds)") sys=$(field "System time (seconds)") wall=$(field "Elapsed (wall clock) time")
maxrss=$(field "Maximum resident set size (kbytes)")
cpu_min=$(python3 -c "print(f'{($user + $sys) / 60:.1f}')")
summary=$( (grep -E '^=+ .*(passed|failed|error).* =+$' "$work/test.log" || echo "no summary: the run was stopped") \
          | tail -n1 | tr -d '=' | sed 's/^ *//;s/ *$//')
printf 'commit %s, load %s busy processes (loadavg %s -> %s), pytest args "%s"\n' "$sha" "$load" "$start_load" "$end_load" "$pytest_args"
printf 'wall %s, user %ss, system %ss, CPU %s min, max RSS %s kB, exit %s\n' "$wall" "$user" "$sys" "$cpu_min" "$maxrss" "$status"
printf 'pytest: %s\n' "$summary"

out="$repo/benchmarks/results/suite_cost.csv"
[ -f "$out" ] || echo "date,commit,label,load_processes,pytest_args,wall,user_s,system_s,cpu_min,max_rss_kb,exit,pytest" > "$out"
# the free-text fields quoted as CSV wants them (a comma in a label once shifted a row's columns)
quote() { printf '"%s"' "${1//\"/\"\"}"; }
echo "$(date -u +%Y-%m-%dT%H:%MZ),$sha,$(quote "$label"),$load,$(quote "$pytest_args"),$wall,$user,$sys,$cpu_min,$maxrss,$status,$(quote "$summary")" >> "$out"
echo "logs: $work/test.log, $work/time.log"
exit "$status"
