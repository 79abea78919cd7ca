#!/bin/bash
# Boot 1: first boot of a machine provisioned by Butane/Ignition with enabled-sysext.conf = overlaybd.
# Scenario a (initrd-style download before systemd-sysext, merge, /etc, Upholds), c (containerd with the
# Butane config.toml, lazy pull and run from the in-guest registry with cred.json), and the first half of
# b (the OS update's postinstall: a missing payload fails it, then it fetches the next release's image).
. /opt/obd-test/lib.sh

a_setup_before_sysext() {
  systemctl status --no-pager flatcar-sysext-setup.service systemd-sysext.service
  [ "$(systemctl show -P Result flatcar-sysext-setup.service)" = success ] || fail "setup step failed"
  local done_at start_at
  done_at=$(systemctl show -P ExecMainExitTimestampMonotonic flatcar-sysext-setup.service)
  start_at=$(systemctl show -P ExecMainStartTimestampMonotonic systemd-sysext.service)
  echo "setup step exited at ${done_at}us, systemd-sysext started at ${start_at}us"
  [ "$done_at" -gt 0 ] && [ "$done_at" -le "$start_at" ] || fail "systemd-sysext did not wait for the setup step"
  journalctl -b -u obd-update-server.service -o cat --no-pager | grep -F "flatcar-overlaybd.gz" \
    || fail "the payload was not fetched from the release server"
}
check a_setup_before_sysext a_setup_before_sysext
check a_stored_and_linked linked_to "$V1" "$RAW1_SHA"
check a_merged merged_version "$V1"

a_etc_populated() {
  ls -l /etc/overlaybd /etc/overlaybd-snapshotter /opt/overlaybd
  test -s /etc/overlaybd/overlaybd.json || fail "no /etc/overlaybd/overlaybd.json"
  test -s /etc/overlaybd-snapshotter/config.json || fail "no /etc/overlaybd-snapshotter/config.json"
  # Ignition wrote cred.json before tmpfiles ran; the C line must have kept it
  echo "$CRED_SHA  /etc/overlaybd/cred.json" | sha256sum -c || fail "cred.json is not the Butane one"
  [ "$(stat -c %a /etc/overlaybd/cred.json)" = 600 ] || fail "cred.json mode $(stat -c %a /etc/overlaybd/cred.json)"
}
check a_etc_populated a_etc_populated

a_daemons_upheld() {
  systemctl show -p Upholds multi-user.target
  systemctl show -P Upholds multi-user.target | grep -q overlaybd-tcmu.service || fail "no Upholds= for overlaybd-tcmu"
  systemctl show -P Upholds multi-user.target | grep -q overlaybd-snapshotter.service || fail "no Upholds= for the snapshotter"
  daemons_up_once
}
check a_daemons_upheld a_daemons_upheld

c_containerd_config() {
  wait_until 60 systemctl is-active -q containerd.service || fail "containerd not active"
  local pid
  pid=$(systemctl show -P MainPID containerd.service)
  tr '\0' ' ' < "/proc/$pid/cmdline"; echo
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "--config /etc/containerd/config.toml" || fail "containerd not started with the Butane config"
  echo "$CONFIG_TOML_SHA  /etc/containerd/config.toml" | sha256sum -c || fail "config.toml differs from the Ignition one"
  wait_until 30 sh -c 'ctr plugins ls | grep -Eq "io.containerd.snapshotter.v1 +overlaybd .* ok"'
  ctr plugins ls | grep -E "snapshotter" || true
  ctr plugins ls | grep -Eq "io.containerd.snapshotter.v1 +overlaybd .* ok" || fail "proxy plugin overlaybd not ok"
}
check c_containerd_config c_containerd_config

start_registry() {
  systemctl start docker-registry.service
  wait_until 60 sh -c 'curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:5000/v2/ | grep -q 401'
}

c_rpull() {
  start_registry || fail "registry did not start"
  local tool=/usr/local/overlaybd/snapshotter/ctr
  if [ -x "$tool" ]; then
    timeout 300 "$tool" rpull --plain-http "$IMAGE" || fail "ctr rpull rc=$?"
  else
    timeout 300 /usr/local/overlaybd/bin/rpull --plain-http "$IMAGE" || fail "rpull rc=$?"
  fi
  ctr images ls
  ctr images ls -q | grep -qxF "$IMAGE" || fail "image not in containerd"
}
check c_rpull c_rpull
check c_run ctr_run_hello c1

c_rootfs_on_tcmu() {
  ctr run -d --snapshotter overlaybd "$IMAGE" c2 /bin/sleep 600 || fail "ctr run -d rc=$?"
  local rootfs=/run/containerd/io.containerd.runtime.v2.task/default/c2/rootfs opts lower src dev
  wait_until 60 findmnt -n "$rootfs"
  findmnt -n -o FSTYPE,OPTIONS "$rootfs"
  opts=$(findmnt -n -o OPTIONS "$rootfs")
  lower=$(echo "$opts" | tr ',' '\n' | sed -n 's/^lowerdir=//p' | cut -d: -f1)
  src=$(findmnt -n -o SOURCE "$lower")
  echo "lowerdir $lower is mounted from $src"
  case "$src" in /dev/sd*) ;; *) fail "container rootfs is not on a SCSI device: $src" ;; esac
  dev=$(basename "$src")
  echo "vendor: $(cat /sys/block/$dev/device/vendor)"
  [ "$(cat /sys/block/$dev/device/vendor | tr -d ' ')" = LIO-ORG ] || fail "$src is not a LIO (TCMU) device"
  ls -d /sys/kernel/config/target/core/user_*/* || fail "no TCMU backstore in configfs"
  ctr task kill -s SIGKILL c2
  wait_until 60 sh -c '! ctr task ls | grep -q "^c2 .*RUNNING"'
  ctr task delete c2 || true
  ctr container delete c2
}
check c_rootfs_on_tcmu c_rootfs_on_tcmu

# Keep what the next boot compares: registry traffic, cache contents, snapshot metadata.
registry_log > "$OUT/registry.log"
find /opt/overlaybd/registry_cache -type f -printf '%P %s\n' | sort > /var/lib/obd-test/cache-boot1.txt
cp /var/lib/obd-test/cache-boot1.txt "$OUT/cache.txt"
ctr snapshots --snapshotter overlaybd ls | sort > /var/lib/obd-test/snapshots-boot1.txt
cp /var/lib/obd-test/snapshots-boot1.txt "$OUT/snapshots.txt"
fact cache_bytes_allocated "$(du -s -B1 /opt/overlaybd/registry_cache | cut -f1)"

# ---- b: the OS update to V2 (update_engine has written the new /usr; its postinstall runs now)
NEXT=/var/lib/obd-test/usr-next
mkdir -p "$NEXT/lib"
cp "/opt/obd-test/os-release-$V2" "$NEXT/lib/os-release"

b_update_without_payload_fails() {
  local rc=0
  /opt/obd-test/flatcar-postinst-sysext "$NEXT" || rc=$?
  echo "postinst rc=$rc"
  [ "$rc" -ne 0 ] || fail "postinst succeeded although the release server has no payload for $V2"
  test ! -e "/etc/flatcar/sysext/flatcar-overlaybd-$V2.raw" || fail "an image for $V2 appeared"
  test -e "/etc/flatcar/sysext/flatcar-overlaybd-$V1.raw" || fail "the running release's image was removed"
}
check b_update_without_payload_fails b_update_without_payload_fails

b_update_fetches_next() {
  # the payload for V2 is published; an image of an older release lies around and must be pruned
  mv "/srv/update-later/amd64-usr/$V2" /srv/update/amd64-usr/
  cp "/etc/flatcar/sysext/flatcar-overlaybd-$V1.raw" /etc/flatcar/sysext/flatcar-overlaybd-1.0.0.raw
  /opt/obd-test/flatcar-postinst-sysext "$NEXT" || fail "postinst rc=$?"
  ls -l /etc/flatcar/sysext
  [ "$(ls /etc/flatcar/sysext | tr '\n' ' ')" = "flatcar-overlaybd-$V1.raw flatcar-overlaybd-$V2.raw " ] \
    || fail "expected exactly the images for $V1 and $V2"
  echo "$RAW2_SHA  /etc/flatcar/sysext/flatcar-overlaybd-$V2.raw" | sha256sum -c
  # update_engine marks the new /usr bootable only when its postinstall succeeded
  touch "$NEXT/activate"
}
check b_update_fetches_next b_update_fetches_next
