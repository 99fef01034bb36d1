#!/usr/bin/env bash
# One part of a long make target, timed: scripts/timed.sh TIMES NAME CMD...
# runs CMD, appends "NAME<TAB>seconds<TAB>result" to the file TIMES, and, if
# CMD failed or NAME is "done", prints every part's time so far, so that a
# run shows where its minutes went, whether it passed or not.
set -uo pipefail
times=$1 name=$2
shift 2
start=$SECONDS
rc=0
if [[ $name != done ]]; then
	"$@" || rc=$?
	result=passed
	((rc == 0)) || result="FAILED (exit $rc)"
	printf '%s\t%d\t%s\n' "$name" $((SECONDS - start)) "$result" >>"$times"
fi
if ((rc != 0)) || [[ $name == done ]]; then
	total=0
	echo "time taken by each part ($times):"
	while IFS=$'\t' read -r part secs result; do
		total=$((total + secs))
		printf '  %-48s %3d min %02d s  %s\n' "$part" $((secs / 60)) $((secs % 60)) "$result"
	done <"$times"
	printf '  %-48s %3d min %02d s\n' "in all" $((total / 60)) $((total % 60))
fi
exit $rc
