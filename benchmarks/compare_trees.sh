#!/usr/bin/env bash
# Screening speed of this tree against another commit, on the same machine, alternating runs:
#   benchmarks/compare_trees.sh REF [VISITS] [ROUNDS]
# REF: a commit (checked out as a git worktree under /tmp); VISITS: a folder of visit folders (default: the
# first visit folders of ../shared/data/visits holding 48 images, copied to /tmp); prints images/s
# (run.json timings: models loaded -> last image written) of each run. Same venv for both trees.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:?give a commit}
ROUNDS=${3:-3}
WT=/tmp/cervscan-ref-$REF
[ -d "$WT" ] || git worktree add -f "$WT" "$REF" >/dev/null
VISITS=${2:-/tmp/cervscan-speed-visits}
if [ ! -d "$VISITS" ]; then
  mkdir -p "$VISITS"; n=0
  for d in ../shared/data/visits/*/; do
    [ "$n" -ge 48 ] && break
    cp -r "$d" "$VISITS/"; n=$((n + $(ls "$d" | wc -l)))
  done
fi
for r in $(seq "$ROUNDS"); do
  for t in ref this; do
    out=/tmp/cervscan-speed-out-$t; rm -rf "$out"
    if [ $t = ref ]; then PYTHONPATH="$WT/src" .venv/bin/python -m cervscan screen "$VISITS" -o "$out" --device cpu -q || true
    else .venv/bin/python -m cervscan screen "$VISITS" -o "$out" --device cpu -q || true; fi
    python3 -c "import json,sys;t=json.load(open('$out/run.json'))['timings'];print('$t', $r, t['images_per_s'])"
  done
done
