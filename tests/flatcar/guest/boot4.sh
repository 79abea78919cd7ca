#!/bin/bash
# Boot 4 (item 3's route): after systemd-sysupdate fetched the newer SYSEXT_LEVEL image, the reboot merges
# it on this release (no VERSION_ID in the image) and both daemons come up once.
. /opt/obd-test/lib.sh

sysupdate_merged() {
  systemd-sysext status --no-pager
  systemd-sysext status --no-pager | grep -qw overlaybd || fail "overlaybd not merged"
  cat /usr/lib/extension-release.d/extension-release.overlaybd
  grep -q "SYSEXT_LEVEL=.\?1.0" /usr/lib/extension-release.d/extension-release.overlaybd || fail "not the SYSEXT_LEVEL image"
  grep -q "$SU_NEW" /usr/lib/extension-release.d/extension-release.overlaybd || fail "not version $SU_NEW"
  daemons_up_once
  snapshotter_reachable sysupdate
}
check sysupdate_merged sysupdate_merged
check sysupdate_run ctr_run_hello c6
