#!/bin/sh
# Compares the live kernel with a tuning profile: prints each key's live value beside the
# profile's and marks what differs. Also shows the open-files and locked-memory limits of
# this shell beside relay.service's.
#
#   tuning/check.sh [throughput|connections|latency|FILE]   (default: throughput)
#
# Exit status: 0 when every key matches, 1 when some differ or are missing, 2 on bad usage.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
profile=${1:-throughput}
case $profile in
  */*|*.conf) file=$profile ;;
  *) file=$here/$profile.conf ;;
esac
[ -r "$file" ] || { echo "check.sh: no profile $file" >&2; exit 2; }

printf '%-36s %-28s %-28s %s\n' KEY LIVE PROFILE ''
# Keys and values, comments and blank lines dropped; tabs and runs of spaces made one space.
grep -v '^[[:space:]]*[#;]' "$file" | grep '=' | while IFS='=' read -r key value; do
  key=$(echo "$key" | tr -d '[:space:]')
  want=$(echo "$value" | tr -s ' \t' '  ' | sed 's/^ //; s/ $//')
  path=/proc/sys/$(echo "$key" | tr . /)
  if [ -r "$path" ]; then
    live=$(tr -s ' \t' '  ' < "$path" | sed 's/^ //; s/ $//')
    if [ "$live" = "$want" ]; then mark=ok; else mark=DIFFERS; fi
  else
    live='(no such key)'
    mark=MISSING
  fi
  printf '%-36s %-28s %-28s %s\n' "$key" "$live" "$want" "$mark"
done > "${TMPDIR:-/tmp}/a7-check.$$"
cat "${TMPDIR:-/tmp}/a7-check.$$"
total=$(wc -l < "${TMPDIR:-/tmp}/a7-check.$$")
differs=$(grep -c ' DIFFERS$' "${TMPDIR:-/tmp}/a7-check.$$" || true)
missing=$(grep -c ' MISSING$' "${TMPDIR:-/tmp}/a7-check.$$" || true)
rm -f "${TMPDIR:-/tmp}/a7-check.$$"

unit=$here/relay.service
limit() { grep "^$1=" "$unit" | cut -d= -f2; }
echo
printf '%-36s %-28s %-28s\n' 'LIMIT (this shell)' LIVE 'relay.service'
printf '%-36s %-28s %-28s\n' LimitNOFILE "$(ulimit -n)" "$(limit LimitNOFILE)"
printf '%-36s %-28s %-28s\n' 'LimitMEMLOCK (KiB)' "$(ulimit -l)" "$(($(limit LimitMEMLOCK) / 1024))"
echo
echo "profile $(basename "$file" .conf): $total keys, $differs differ, $missing missing on this kernel"
[ "$differs" -eq 0 ] && [ "$missing" -eq 0 ]
