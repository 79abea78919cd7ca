#!/bin/bash
# Boot 3: a hand-placed image for another release. Scenario b (systemd-sysext refuses it; containerd,
# configured for the proxy plugin, fails fast with a clear error) and d (the right image added at run time
# plus `systemd-sysext refresh` starts both daemons once).
. /opt/obd-test/lib.sh

b_wrong_version_refused() {
  ls -l /etc/extensions
  systemd-sysext status --no-pager
  ! systemd-sysext status --no-pager | grep -q flatcar-overlaybd || fail "the $V1 image was merged on $V2"
  test ! -e /usr/local/overlaybd || fail "/usr/local/overlaybd exists"
  [ "$(systemctl show -P LoadState overlaybd-tcmu.service)" = not-found ] || fail "overlaybd-tcmu.service is loaded"
  SYSTEMD_LOG_LEVEL=debug systemd-sysext list --no-pager 2>&1 | tee "$OUT/sysext-debug.txt" | grep -i flatcar-overlaybd || true
  SYSTEMD_LOG_LEVEL=debug systemd-sysext refresh 2>&1 | tee -a "$OUT/sysext-debug.txt" | grep -i "flatcar-overlaybd" || true
  ! systemd-sysext status --no-pager | grep -q flatcar-overlaybd || fail "merged by refresh"
  grep -F "Extension 'flatcar-overlaybd' is for OS '$V1', but deployed on top of '$V2'" "$OUT/sysext-debug.txt" \
    || fail "systemd-sysext did not say why it skipped the image"
}
check b_wrong_version_refused b_wrong_version_refused

b_containerd_fails_fast() {
  wait_until 60 systemctl is-active -q containerd.service || fail "containerd not active"
  ctr plugins ls | grep -E "snapshotter" || true
  local t0 t1 rc=0 out
  t0=$(date +%s%N)
  out=$(timeout 120 ctr run --rm --snapshotter overlaybd "$IMAGE" c4 /bin/true 2>&1) || rc=$?
  t1=$(date +%s%N)
  echo "ctr run rc=$rc after $(( (t1 - t0) / 1000000 )) ms: $out"
  printf '%s\n' "$out" > "$OUT/ctr-run-error.txt"
  echo "$(( (t1 - t0) / 1000000 ))" > "$OUT/ctr-run-ms.txt"
  [ "$rc" -ne 0 ] || fail "ctr run succeeded without the snapshotter"
  [ "$rc" -ne 124 ] || fail "ctr run hung for 120 s"
  t0=$(date +%s%N)
  rc=0
  out=$(timeout 120 ctr snapshots --snapshotter overlaybd prepare obd-probe 2>&1) || rc=$?
  t1=$(date +%s%N)
  echo "ctr snapshots prepare rc=$rc after $(( (t1 - t0) / 1000000 )) ms: $out"
  printf '%s\n' "$out" > "$OUT/ctr-prepare-error.txt"
  echo "$(( (t1 - t0) / 1000000 ))" > "$OUT/ctr-prepare-ms.txt"
  [ "$rc" -ne 0 ] || fail "prepare succeeded without the snapshotter"
}
check b_containerd_fails_fast b_containerd_fails_fast

d_runtime_merge() {
  ln -sfn "/etc/flatcar/sysext/flatcar-overlaybd-$V2.raw" /etc/extensions/flatcar-overlaybd.raw
  systemd-sysext refresh || fail "refresh rc=$?"
  merged_version "$V2"
  daemons_up_once
  snapshotter_reachable runtime_merge
}
check d_runtime_merge d_runtime_merge
check d_run_after_merge ctr_run_hello c5

# Item 3's route (present when the host built it): switch this machine to the SYSEXT_LEVEL image under
# /opt/extensions/overlaybd as Butane's delivery=sysupdate sets it up, then let systemd-sysupdate fetch the
# newer version from the in-guest server; boot 4 checks that it is merged.
if [ -d /opt/obd-test/sysupdate-route ]; then
  sysupdate_update() {
    local kit=/opt/obd-test/sysupdate-route link target
    rm -f /etc/extensions/flatcar-overlaybd.raw
    mkdir -p /etc/sysupdate.overlaybd.d /opt/extensions/overlaybd
    cp "$kit/overlaybd.transfer" /etc/sysupdate.overlaybd.d/overlaybd.transfer
    cp "$kit/overlaybd_${SU_OLD}_x86-64.raw" /opt/extensions/overlaybd/
    read -r link target < "$kit/link"
    ln -sfn "$target" "$link"
    cat /etc/sysupdate.overlaybd.d/overlaybd.transfer
    sysupdate list || fail "systemd-sysupdate list rc=$?"
    sysupdate update || fail "systemd-sysupdate update rc=$?"
    sysupdate list
    ls -l /opt/extensions/overlaybd /etc/extensions
    # CurrentSymlink= writes a relative link
    [ "$(readlink -f /etc/extensions/overlaybd.raw)" = "/opt/extensions/overlaybd/overlaybd_${SU_NEW}_x86-64.raw" ] \
      || fail "overlaybd.raw points to $(readlink /etc/extensions/overlaybd.raw)"
    local want
    want=$(eval echo "\$SU_${SU_NEW//./_}_SHA")
    echo "$want  /opt/extensions/overlaybd/overlaybd_${SU_NEW}_x86-64.raw" | sha256sum -c
  }
  check sysupdate_update sysupdate_update
fi
