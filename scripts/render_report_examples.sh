#!/usr/bin/env bash
# Render the example reports shown in docs/reports/ (PNG pages) from the shipped weights.
# Needs pdftoppm (poppler-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cervscan screen examples/visits -o "$tmp/out" --device cpu --quiet
cervscan report "$tmp/out" --clinic "Example clinic" >/dev/null
rm -f docs/reports/*.png
mkdir -p docs/reports
for pdf in "$tmp"/out/reports/*.pdf; do
    pdftoppm -png -r 70 "$pdf" "docs/reports/$(basename "${pdf%.pdf}")"
done
ls docs/reports
