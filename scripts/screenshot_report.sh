#!/usr/bin/env bash
# Render an HTML report (e.g. a backfill report.html) to a PNG with headless Chromium.
# Usage: scripts/screenshot_report.sh REPORT.html OUT.png
# Needs /usr/bin/chromium (Debian: apt-get install chromium). No network is used.
set -euo pipefail
if [ "$#" -ne 2 ]; then
    echo "usage: $0 REPORT.html OUT.png" >&2
    exit 2
fi
report="$(realpath "$1")"
out="$(realpath -m "$2")"
[ -f "$report" ] || { echo "error: $report: no such file" >&2; exit 2; }
chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || { echo "error: $chromium not found (apt-get install chromium)" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --screenshot="$out" --window-size=1280,4000 "file://$report" >/dev/null 2>&1
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
