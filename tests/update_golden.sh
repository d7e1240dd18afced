#!/usr/bin/env bash
# Regenerate examples/expected/ from the shipped weights (run after weights/ changes).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
cervscan screen examples/visits -o "$tmp/out" --device cpu --quiet
mkdir -p examples/expected
cp "$tmp/out/patients.csv" "$tmp/out/images.csv" examples/expected/
python - "$tmp/out/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
meta = {r: {k: run["models"][r][k] for k in ("label", "sha256", "name", "version")} for r in run["models"]}
json.dump(meta, open("examples/expected/models.json", "w"), indent=2)
PY
# paths in the CSVs are machine-specific: keep them relative
sed -i "s#$(pwd)/##g" examples/expected/images.csv
rm -rf "$tmp"
echo "updated examples/expected/"
