#!/bin/bash
# Boot 2: the machine rebooted into the updated /usr (V2). Scenario b (the setup step re-points the link to
# the image the postinstall fetched, systemd-sysext merges it) and e (the registry cache and the snapshot
# metadata survived; the same container runs without fetching from the registry).
. /opt/obd-test/lib.sh

b_booted_next() {
  grep -x "VERSION_ID=$V2" /usr/lib/os-release || fail "not running $V2"
  [ "$(systemctl show -P Result flatcar-sysext-setup.service)" = success ] || fail "setup step failed"
  # nothing was downloaded at boot: the postinstall had fetched it
  ! journalctl -b -u obd-update-server.service -o cat --no-pager | grep -F "flatcar-overlaybd.gz" || fail "downloaded again at boot"
  test -e "/etc/flatcar/sysext/flatcar-overlaybd-$V1.raw" || fail "previous image pruned too early"
}
check b_booted_next b_booted_next
check b_next_linked linked_to "$V2" "$RAW2_SHA"
check b_next_merged merged_version "$V2"
check b_next_daemons daemons_up_once

e_state_survived() {
  find /opt/overlaybd/registry_cache -type f -printf '%P %s\n' | sort > "$OUT/cache.txt"
  diff /var/lib/obd-test/cache-boot1.txt "$OUT/cache.txt" || fail "registry cache changed across the reboot"
  test -s "$OUT/cache.txt" || fail "registry cache is empty"
  ls -l /var/lib/containerd/io.containerd.snapshotter.v1.overlaybd
  ctr snapshots --snapshotter overlaybd ls | sort > "$OUT/snapshots.txt"
  diff /var/lib/obd-test/snapshots-boot1.txt "$OUT/snapshots.txt" || fail "snapshots changed across the reboot"
  ctr images ls -q | grep -qxF "$IMAGE" || fail "image gone"
}
check e_state_survived e_state_survived

e_run_again_without_fetch() {
  systemctl start docker-registry.service
  wait_until 60 sh -c 'curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:5000/v2/ | grep -q 401'
  ctr_run_hello c3
  registry_log > "$OUT/registry.log"
  ! grep -E '"GET /v2/[^ ]*/blobs/' "$OUT/registry.log" || fail "blobs were fetched again"
  find /opt/overlaybd/registry_cache -type f -printf '%P %s\n' | sort > "$OUT/cache-after.txt"
}
check e_run_again_without_fetch e_run_again_without_fetch

# Prepare boot 3: this machine opts out of the official route and keeps a hand-placed image, which is
# now for the wrong release (the V1 image on the V2 OS).
rm -f /etc/flatcar/enabled-sysext.conf
ln -sfn "/etc/flatcar/sysext/flatcar-overlaybd-$V1.raw" /etc/extensions/flatcar-overlaybd.raw
