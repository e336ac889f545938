#!/usr/bin/env bash
# Runs the README's walk-through, exactly as written, against natter at
# $NATTER_URL, in a scratch directory, and checks what it printed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
cd "$work"
sed -n '/<!-- walkthrough:start -->/,/<!-- walkthrough:end -->/p' "$root/README.md" | sed '1,2d;$d' | sed '$d' > walkthrough.sh
bash -euo pipefail walkthrough.sh | tee out.txt
grep -q '{"seq":"3","text":"12:30 at the usual place"}' out.txt
grep -q '"unreadCount":"3"' out.txt
grep -q '{"readSeq":"3","unreadCount":"0"}' out.txt
grep -q '"nextPageToken":"' out.txt
# The live stream saw all three messages; the resumed one exactly seqs 2 and 3.
[ "$(jq -r 'select(.messageCreated) | .seq' bob-stream.json | tr '\n' ' ')" = "1 2 3 " ]
[ "$(jq -r 'select(.messageCreated) | .seq' bob-resume.json | tr '\n' ' ')" = "2 3 " ]
echo "walkthrough: ok"
