#!/usr/bin/env bash
# Demo settings side by side on one machine: every setting is one `RUNS=N bash scripts/quickstart.sh METHOD` with its
# own flags, all settings at once (a GPU has room for many 32 px demo models; on a 2-core CPU use PARALLEL=1).
#   bash scripts/sweep.sh SETTINGS ROOT
# SETTINGS: one line per setting, '#' comments allowed:
#   NAME METHOD [VAR="value" ...]     e.g.  moco_t8 moco POISON_EXTRA="--trigger-size 8" EXTRA="--epochs 100"
# (VAR: any of quickstart.sh's environment, e.g. POISON_EXTRA, EXTRA, RUNS, TARGETS). Setting NAME goes to
# ROOT/knobs/NAME (quickstart.sh's RUNS layout: clean/, run<r>/, table.md) with its log in ROOT/knobs/NAME.log.
# Environment: RUNS=2 and TARGETS (default: every setting's runs 0..RUNS-1 with runs.py's targets), JOBS=3 models at
# once per setting, PARALLEL=all settings at once, LIMIT=<seconds> (default none) stops what is still running, so that
# the finished settings are summarised. At the end ROOT/summary.md holds `tables.py runs` of every setting.
set -uo pipefail
SETTINGS=${1:?usage: bash scripts/sweep.sh SETTINGS ROOT}
ROOT=${2:?usage: bash scripts/sweep.sh SETTINGS ROOT}
[ -f "$SETTINGS" ] || { echo "sweep.sh: $SETTINGS: no such settings file" >&2; exit 2; }
SETTINGS=$(cd "$(dirname "$SETTINGS")" && pwd)/$(basename "$SETTINGS")
cd "$(dirname "$0")/.."
mkdir -p "$ROOT/knobs"
start=$(date +%s)
n=0
while read -r NAME METHOD REST; do
  [ -z "$NAME" ] || [ "${NAME:0:1}" = "#" ] && continue
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-1000}" ]; do wait -n; done
  (
    export RUNS=${RUNS:-2} JOBS=${JOBS:-3}
    eval "export $REST"
    ${LIMIT:+timeout --kill-after 10 $LIMIT} bash scripts/quickstart.sh "$METHOD" "$ROOT/knobs/$NAME"
  ) > "$ROOT/knobs/$NAME.log" 2>&1 &
  n=$((n + 1))
done < "$SETTINGS"
wait
{
  echo "# $n settings of $SETTINGS, $(( $(date +%s) - start )) s on $(nproc) cores$(command -v nvidia-smi > /dev/null &&
        nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/ and one /')"
  for D in "$ROOT"/knobs/*/; do
    NAME=$(basename "$D")
    echo; echo "## $NAME: $(grep -v '^#' "$SETTINGS" | awk -v n="$NAME" '$1 == n {$1 = ""; print}')"; echo
    python3 scripts/tables.py runs "$D"
  done
} > "$ROOT/summary.md"
cat "$ROOT/summary.md"
