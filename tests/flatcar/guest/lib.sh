# Helpers for the boot scripts (sourced). Each check appends "BOOT<TAB>NAME<TAB>ok|FAIL ..." to
# /results/results.tsv and keeps its output in /results/bootN/NAME.log; facts go to facts.tsv.
set -u
BOOT=$(cat /var/lib/obd-test/boot)
OUT=/results/boot$BOOT
# shellcheck source=/dev/null
. /opt/obd-test/expected.env
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# check NAME CMD...: run CMD (a function or program) in a subshell, record ok or FAIL with its exit code.
check() {
  local name="$1" rc=0
  shift
  ( "$@" ) > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    printf '%s\t%s\tok\n' "$BOOT" "$name" >> /results/results.tsv
  else
    printf '%s\t%s\tFAIL rc=%s: %s\n' "$BOOT" "$name" "$rc" "$(tail -n 3 "$OUT/$name.log" | tr '\t\n' '  ')" >> /results/results.tsv
  fi
  echo "CHECK $name rc=$rc at uptime $(cut -d" " -f1 /proc/uptime)"
  return 0
}

fact() { printf '%s\t%s\t%s\n' "$BOOT" "$1" "$2" >> /results/facts.tsv; }

# wait_until SECONDS CMD...: poll CMD once a second.
wait_until() {
  local n="$1"
  shift
  for _ in $(seq "$n"); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 1
  done
  "$@"
}

say() { echo "== $*"; }
fail() { echo "FAIL: $*"; exit 1; }  # checks run in a subshell

# Both daemons active, started once (no restart), still so after a while (no restart loop).
daemons_up_once() {
  local u
  for u in overlaybd-tcmu.service overlaybd-snapshotter.service; do
    wait_until 180 systemctl is-active -q "$u" || { systemctl status --no-pager "$u"; fail "$u not active"; return 1; }
  done
  sleep 10
  for u in overlaybd-tcmu.service overlaybd-snapshotter.service; do
    systemctl show -p ActiveState -p SubState -p NRestarts -p ExecMainStartTimestampMonotonic "$u"
    [ "$(systemctl show -P ActiveState "$u")" = active ] || fail "$u no longer active"
    [ "$(systemctl show -P NRestarts "$u")" = 0 ] || fail "$u restarted"
  done
  wait_until 120 test -S /run/overlaybd-snapshotter/overlaybd.sock || fail "no snapshotter socket"
}

# containerd reaches the snapshotter: `active` (Type=simple) comes before the socket is served, and
# containerd's proxy client retries a failed connection only after a backoff of up to 3 s.
snapshotter_reachable() {
  local t0 t1
  t0=$(date +%s%N)
  wait_until 60 sh -c 'ctr snapshots --snapshotter overlaybd prepare obd-probe >/dev/null && ctr snapshots --snapshotter overlaybd rm obd-probe' \
    || fail "containerd cannot reach the snapshotter"
  t1=$(date +%s%N)
  fact "${1:-snapshotter}_reachable_after_ms" "$(( (t1 - t0) / 1000000 ))"
}

merged_version() {
  # the extension-release of the merged image, as seen in /usr
  systemd-sysext status --no-pager
  grep -q flatcar-overlaybd <(systemd-sysext status --no-pager) || fail "flatcar-overlaybd not listed"
  cat /usr/lib/extension-release.d/extension-release.flatcar-overlaybd
  grep -qx "VERSION_ID=[\"']\?$1[\"']\?" /usr/lib/extension-release.d/extension-release.flatcar-overlaybd \
    || fail "merged image is not for $1"
}

linked_to() {
  ls -l /etc/extensions/ /etc/flatcar/sysext/
  [ "$(readlink /etc/extensions/flatcar-overlaybd.raw)" = "/etc/flatcar/sysext/flatcar-overlaybd-$1.raw" ] \
    || fail "link points to $(readlink /etc/extensions/flatcar-overlaybd.raw)"
  echo "$2  /etc/flatcar/sysext/flatcar-overlaybd-$1.raw" | sha256sum -c
}

# Run systemd-sysupdate with the item-3 transfer files when they are installed (hook for that route).
sysupdate() {
  /usr/lib/systemd/systemd-sysupdate --component=overlaybd "$@"
}

ctr_run_hello() {
  # ctr run --rm on the overlaybd snapshotter, output must be the image's /etc/hello.txt
  local out
  out=$(timeout 300 ctr run --rm --snapshotter overlaybd "$IMAGE" "$1" /bin/cat /etc/hello.txt) || fail "ctr run rc=$?"
  echo "$out"
  [ "$out" = "$HELLO" ] || fail "unexpected output"
}

registry_log() { journalctl -b -u docker-registry.service -o cat --no-pager; }
