#!/usr/bin/env bash
# Build the flatcar-overlaybd systemd-sysext image.
#
#   build.sh --flatcar-version 4593.2.5 [--arch x86-64|arm64] [--format erofs|squashfs]
#            [--payload-key PEM | --no-payload] [--out DIR] [--target-glibc X.Y] [--reuse-bundle]
#   build.sh --sysext-level --flatcar-version OLDEST [--sysext-version V] [--sysupdate-url URL] ...
#   build.sh --bundle-only [--out DIR]            # just the frozen onedir -> OUT/bundle
#   build.sh --print-key --flatcar-version V ...  # the input key a finished image is stored under
#
# Lockstep (default, Flatcar's official route): OUT/flatcar-overlaybd.raw with VERSION_ID=<release>,
# the signed update payload OUT/flatcar_test_update-flatcar-overlaybd.gz (update_engine format, as
# delta_generator makes it; RSA key from --payload-key, else a throwaway dev key OUT/dev-payload-key.pem)
# and its public key OUT/update-payload-key.pub.pem, plus Flatcar's listings (_contents.txt,
# _contents_wtd.txt, _disk_usage.txt). --sysext-level (alias --portable): ID=flatcar + SYSEXT_LEVEL=1.0,
# named for systemd-sysupdate OUT/overlaybd_<V>_<arch>.raw, with OUT/SHA256SUMS and OUT/overlaybd.transfer.
# Steps: protobuf stubs, PyInstaller freeze (one multi-call executable) into OUT/bundle, stage usr/,
# glibc check against the target release, normalise modes/mtimes, mkfs (erofs lz4hc, or squashfs zstd).
# Same inputs + SOURCE_DATE_EPOCH => same bytes (images and payloads).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
NAME=flatcar-overlaybd
FLATCAR_VERSION=""
FORMAT=erofs
PORTABLE=0
SYSEXT_VERSION=""
SYSUPDATE_URL=""
PAYLOAD_KEY=""
NO_PAYLOAD=0
OUT=$REPO/out
BUNDLE_ONLY=0
REUSE_BUNDLE=0
PRINT_KEY=0
TARGET_GLIBC=""
case "$(uname -m)" in
    x86_64) HOST_ARCH=x86-64 ;;
    aarch64) HOST_ARCH=arm64 ;;
    *) HOST_ARCH=$(uname -m) ;;
esac
ARCH=$HOST_ARCH

die() { echo "build.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --flatcar-version) FLATCAR_VERSION=${2:?}; shift ;;
        --flatcar-version=*) FLATCAR_VERSION=${1#*=} ;;
        --arch) ARCH=${2:?}; shift ;;
        --arch=*) ARCH=${1#*=} ;;
        --format) FORMAT=${2:?}; shift ;;
        --format=*) FORMAT=${1#*=} ;;
        --portable|--sysext-level) PORTABLE=1 ;;
        --sysext-version) SYSEXT_VERSION=${2:?}; shift ;;
        --sysext-version=*) SYSEXT_VERSION=${1#*=} ;;
        --sysupdate-url) SYSUPDATE_URL=${2:?}; shift ;;
        --sysupdate-url=*) SYSUPDATE_URL=${1#*=} ;;
        --payload-key) PAYLOAD_KEY=${2:?}; shift ;;
        --payload-key=*) PAYLOAD_KEY=${1#*=} ;;
        --no-payload) NO_PAYLOAD=1 ;;
        --out) OUT=${2:?}; shift ;;
        --out=*) OUT=${1#*=} ;;
        --target-glibc) TARGET_GLIBC=${2:?}; shift ;;
        --target-glibc=*) TARGET_GLIBC=${1#*=} ;;
        --bundle-only) BUNDLE_ONLY=1 ;;
        --reuse-bundle) REUSE_BUNDLE=1 ;;
        --print-key) PRINT_KEY=1 ;;
        -h|--help) usage 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done

case "$ARCH" in
    x86_64) ARCH=x86-64 ;;
    aarch64) ARCH=arm64 ;;
    x86-64|arm64) ;;
    *) die "--arch: '$ARCH' is not x86-64 or arm64" ;;
esac
[ "$ARCH" = "$HOST_ARCH" ] || die "--arch: $ARCH differs from the build host ($HOST_ARCH); PyInstaller cannot cross-freeze"
case "$FORMAT" in erofs|squashfs) ;; *) die "--format: '$FORMAT' is not erofs or squashfs" ;; esac
if [ "$BUNDLE_ONLY" = 0 ]; then
    [ -n "$FLATCAR_VERSION" ] || die "--flatcar-version is required (VERSION_ID of the target Flatcar release, e.g. 4593.2.5)"
    [[ "$FLATCAR_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--flatcar-version: '$FLATCAR_VERSION' is not MAJOR.MINOR.PATCH"
fi
[ -x "$PY" ] || die "python '$PY' not found (run 'make venv' or set PYTHON)"
if [ "$PORTABLE" = 1 ]; then
    [ -z "$PAYLOAD_KEY" ] || die "--payload-key: update payloads are for the lockstep image (the official route), not --sysext-level"
    NO_PAYLOAD=1
    [ -n "$SYSEXT_VERSION" ] || SYSEXT_VERSION=$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from overlaybd import __version__; print(__version__)' "$REPO/python")
    [[ "$SYSEXT_VERSION" =~ ^[0-9A-Za-z][0-9A-Za-z.+~-]*$ ]] || die "--sysext-version: '$SYSEXT_VERSION' is not a version (letters, digits, . + ~ -; no '_')"
    [ -n "$SYSUPDATE_URL" ] || SYSUPDATE_URL=https://example.invalid/overlaybd/
    [[ "$SYSUPDATE_URL" =~ ^https?://[^[:space:]]+$ ]] || die "--sysupdate-url: '$SYSUPDATE_URL' is not an http(s) URL"
else
    [ -z "$SYSEXT_VERSION" ] || die "--sysext-version needs --sysext-level (the lockstep image is versioned by --flatcar-version)"
    [ -z "$SYSUPDATE_URL" ] || die "--sysupdate-url needs --sysext-level"
fi
if [ -n "$PAYLOAD_KEY" ]; then
    [ "$NO_PAYLOAD" = 0 ] || die "--payload-key and --no-payload exclude each other"
    [ -r "$PAYLOAD_KEY" ] || die "--payload-key: '$PAYLOAD_KEY' is not a readable file"
    PAYLOAD_KEY=$(cd "$(dirname "$PAYLOAD_KEY")" && pwd)/$(basename "$PAYLOAD_KEY")
fi

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH: '$SOURCE_DATE_EPOCH' is not an integer"
export SOURCE_DATE_EPOCH PYTHONHASHSEED=0 LC_ALL=C TZ=UTC
umask 022

tool() { PYTHONPATH="$REPO/python" "$PY" "$REPO/sysext/buildtool.py" "$@"; }
if [ -n "$PAYLOAD_KEY" ]; then
    tool check-key "$PAYLOAD_KEY" >/dev/null || die "--payload-key: '$PAYLOAD_KEY' is not a usable RSA private key"
    payload_id=$(tool key-id "$PAYLOAD_KEY")
elif [ "$NO_PAYLOAD" = 1 ]; then
    payload_id=none
else
    payload_id=dev
fi
key_args=("$FLATCAR_VERSION" "$ARCH" "$FORMAT" "$PORTABLE" "$TARGET_GLIBC" "$SOURCE_DATE_EPOCH"
          "$SYSEXT_VERSION" "$SYSUPDATE_URL" "$payload_id")
if [ "$PRINT_KEY" = 1 ]; then
    tool input-key "$REPO" "${key_args[@]}"
    exit 0
fi

mkdir -p "$OUT"
BUNDLE=$OUT/bundle
t_start=$(date +%s.%N)

# ---- 1. freeze ------------------------------------------------------------------------------------
build_bundle() {
    echo ">> protobuf stubs"
    "$PY" "$REPO/python/gen_protos.py"
    echo ">> PyInstaller (onedir, stripped, one multi-call executable)"
    rm -rf "$OUT/pyi-dist" "$OUT/pyi-work"
    OBD_REPO=$REPO "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
        --distpath "$OUT/pyi-dist" --workpath "$OUT/pyi-work" "$REPO/sysext/overlaybd.spec"
    rm -rf "$BUNDLE.new"
    mv "$OUT/pyi-dist/overlaybd" "$BUNDLE.new"
    rm -rf "$OUT/pyi-dist" "$OUT/pyi-work"
    # PyInstaller's bootloader links libz.so.1 without a run path, i.e. from the host. Point it at the
    # bundled copy so that glibc is the only thing taken from the host. (The archive lives in an ELF
    # section, "pydata", so patchelf keeps it intact.)
    patchelf --set-rpath '$ORIGIN/_internal' "$BUNDLE.new/overlaybd"
    [ -e "$BUNDLE.new/_internal/libz.so.1" ] || die "$BUNDLE.new/_internal/libz.so.1 missing (needed by the bootloader)"
    # Entry points: bin/<tool> -> ../overlaybd; multicall dispatches on the basename of argv[0].
    mkdir "$BUNDLE.new/bin"
    ln -s ../overlaybd "$BUNDLE.new/bin/overlaybd"
    local t
    for t in $(tool tools); do ln -s ../overlaybd "$BUNDLE.new/bin/$t"; done
    # Default configs (copied to /etc by tmpfiles) and upstream-compatible layout.
    install -D -m 0644 "$REPO/usr-etc/overlaybd/overlaybd.json" "$BUNDLE.new/etc/overlaybd.json"
    install -D -m 0600 "$REPO/usr-etc/overlaybd/cred.json" "$BUNDLE.new/etc/cred.json"
    install -D -m 0644 "$REPO/usr-etc/snapshotter/config.json" "$BUNDLE.new/snapshotter/etc/config.json"
    if [ -e "$BUNDLE.new/bin/overlaybd-snapshotter" ]; then
        ln -s ../overlaybd "$BUNDLE.new/snapshotter/overlaybd-snapshotter"
    fi
    # Upstream's snapshotter/ tools (ctr with rpull, convertor, overlaybd-attacher) at upstream's paths.
    for t in $(tool snapshotter-tools); do ln -s ../overlaybd "$BUNDLE.new/snapshotter/$t"; done
    # The empty ext4 base layer upstream ships (convertor --mkfs=false); needs /dev/fuse and loop devices.
    mkdir "$BUNDLE.new/baselayers"
    tool baselayer "$BUNDLE.new/baselayers/ext4_64" "$SOURCE_DATE_EPOCH" || die "building baselayers/ext4_64 failed"
    chmod 0644 "$BUNDLE.new/baselayers/ext4_64"
    rm -rf "$BUNDLE"
    mv "$BUNDLE.new" "$BUNDLE"
}

if [ "$REUSE_BUNDLE" = 1 ] && [ -x "$BUNDLE/overlaybd" ]; then
    echo ">> reusing $BUNDLE"
else
    build_bundle
fi
t_bundle=$(date +%s.%N)
echo ">> bundle: $(du -sm "$BUNDLE" | cut -f1) MiB, tools: $(cd "$BUNDLE/bin" && echo *)"
env -i "$BUNDLE/bin/overlaybd" --version >/dev/null || die "$BUNDLE/bin/overlaybd --version failed with an empty environment"
if [ "$BUNDLE_ONLY" = 1 ]; then
    tool glibc-required "$BUNDLE" | sed 's/^/>> glibc needed: /'
    exit 0
fi

# ---- 2. stage usr/ --------------------------------------------------------------------------------
ROOT=$OUT/sysext-root
echo ">> staging $ROOT"
rm -rf "$ROOT"
mkdir -p "$ROOT/usr/local" "$ROOT/usr/lib/systemd/system/multi-user.target.d" "$ROOT/usr/lib/tmpfiles.d"
cp -a "$BUNDLE" "$ROOT/usr/local/overlaybd"
install -m 0644 "$REPO"/units/*.service "$ROOT/usr/lib/systemd/system/"
install -m 0644 "$REPO/units/multi-user.target.d/10-overlaybd.conf" "$ROOT/usr/lib/systemd/system/multi-user.target.d/"
install -m 0644 "$REPO"/usr-etc/tmpfiles.d/*.conf "$ROOT/usr/lib/tmpfiles.d/"
if [ "$PORTABLE" = 1 ]; then
    tool extension-release --root "$ROOT" --arch "$ARCH" --portable --sysext-version "$SYSEXT_VERSION"
else
    tool extension-release --root "$ROOT" --arch "$ARCH" --flatcar-version "$FLATCAR_VERSION"
fi
[ "$(ls -A "$ROOT")" = usr ] || die "$ROOT: only usr/ may be in a sysext image, found: $(ls -A "$ROOT")"
[ ! -e "$ROOT/usr/lib/os-release" ] || die "$ROOT/usr/lib/os-release must not be in a sysext image"

# ---- 3. checks ------------------------------------------------------------------------------------
glibc_for=$FLATCAR_VERSION
if [ "$PORTABLE" = 1 ] && [ -z "$glibc_for" ]; then
    [ -n "$TARGET_GLIBC" ] || die "--portable needs --flatcar-version (oldest release to support) or --target-glibc"
    glibc_for=0.0.0
fi
tool glibc-check "$ROOT/usr" --flatcar-version "$glibc_for" ${TARGET_GLIBC:+--target-glibc "$TARGET_GLIBC"}
tool normalize "$ROOT" "$SOURCE_DATE_EPOCH"

# ---- 4. image -------------------------------------------------------------------------------------
if [ "$PORTABLE" = 1 ]; then
    IMGBASE=overlaybd_${SYSEXT_VERSION}_${ARCH}
    SYSEXT_ID=overlaybd
else
    IMGBASE=$NAME
    SYSEXT_ID=$NAME
fi
IMG=$OUT/$IMGBASE.raw
rm -f "$IMG.tmp"
echo ">> mkfs ($FORMAT)"
if [ "$FORMAT" = erofs ]; then
    # Fixed UUID and timestamp; erofs-utils 1.5 has no 'fragments' (Flatcar adds -Efragments on >= 1.6).
    uuid=$("$PY" -c 'import sys, uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, "flatcar-overlaybd:" + ":".join(sys.argv[1:])))' \
        "$FLATCAR_VERSION" "$ARCH" "$PORTABLE" "$SOURCE_DATE_EPOCH" $SYSEXT_VERSION)
    mkfs.erofs -zlz4hc,12 -C65536 -Eztailpacking -x-1 --all-root -T"$SOURCE_DATE_EPOCH" -U"$uuid" \
        --quiet "$IMG.tmp" "$ROOT"
else
    # mksquashfs takes SOURCE_DATE_EPOCH (exported above) as the fs time and clamps file times to it.
    mksquashfs "$ROOT" "$IMG.tmp" -noappend -all-root -no-xattrs -comp zstd -reproducible \
        -quiet -no-progress >/dev/null
fi
mv -f "$IMG.tmp" "$IMG"
(cd "$OUT" && sha256sum "$IMGBASE.raw" > "$IMGBASE.raw.sha256")

# ---- 5. listings, payload, sysupdate files -----------------------------------------------------------
# The listings Flatcar publishes beside an image (build_library/reports_util.sh formats), made from the
# image itself, loop-mounted read-only as Flatcar's build does; without root, from the staged tree.
write_listings() {  # DIR PREFIX
    (cd "$1" && TZ=UTC find . -printf '%M %2n %-7u %-7g %7s %TY-%Tm-%Td %TH:%TM ./%P -> %l\n' \
        | sort --key=8 | sed -e 's/ -> $//') > "$2_contents.txt"
    (cd "$1" && find . -printf '%M %D %i %n %s ./%P\n' | sort --key=6) > "$2_contents_wtd.txt"
    (cd "$1" && df --human-readable --output='file,size,used,avail,pcent,fstype' ./ \
        | sed -e 's#^\.\(/[^ ]*\)#\1 #') > "$2_disk_usage.txt"
}
mnt=$(mktemp -d "$OUT/.mnt.XXXXXX")
if [ "$(id -u)" = 0 ] && mount -t "$FORMAT" -o loop,ro "$IMG" "$mnt" 2>/dev/null; then
    write_listings "$mnt" "$OUT/$IMGBASE" || { umount -d "$mnt"; rmdir "$mnt"; die "listing $IMG failed"; }
    umount -d "$mnt"
else
    echo ">> listings from the staged tree (loop-mounting the image needs root)"
    write_listings "$ROOT" "$OUT/$IMGBASE"
fi
rmdir "$mnt"
PAYLOAD=$OUT/flatcar_test_update-$NAME.gz
if [ "$NO_PAYLOAD" = 0 ]; then
    if [ -z "$PAYLOAD_KEY" ]; then
        PAYLOAD_KEY=$OUT/dev-payload-key.pem
        if [ ! -e "$PAYLOAD_KEY" ]; then
            tool gen-key "$PAYLOAD_KEY"
            echo ">> NOTE: no --payload-key given: generated a THROWAWAY dev key $PAYLOAD_KEY (machines must trust its public half)"
        else
            echo ">> NOTE: no --payload-key given: signing with the dev key $PAYLOAD_KEY"
        fi
    fi
    echo ">> update payload (signed with $PAYLOAD_KEY)"
    tool payload "$IMG" "$PAYLOAD" --key "$PAYLOAD_KEY" --pubkey-out "$OUT/update-payload-key.pub.pem"
elif [ "$PORTABLE" = 0 ]; then
    rm -f "$PAYLOAD"  # --no-payload: no stale payload of an earlier image beside this one
fi
if [ "$PORTABLE" = 1 ]; then
    # systemd-sysupdate's url-file source reads SHA256SUMS from the base URL: list every version in OUT.
    tool sha256sums "$OUT" 'overlaybd_*_*.raw'
    tool sysupdate-transfer --url "$SYSUPDATE_URL" > "$OUT/overlaybd.transfer"
fi
tool input-key "$REPO" "${key_args[@]}" > "$IMG.key"
t_end=$(date +%s.%N)

echo ">> contents ($OUT/${IMGBASE}_contents.txt):"
cat "$OUT/${IMGBASE}_contents.txt"
echo ">> disk usage:"
cat "$OUT/${IMGBASE}_disk_usage.txt"
echo ">> extension-release:"
sed 's/^/   /' "$ROOT/usr/lib/extension-release.d/extension-release.$SYSEXT_ID"
awk -v img="$IMG" -v fmt="$FORMAT" -v size="$(stat -c %s "$IMG")" -v t0="$t_start" -v t1="$t_bundle" -v t2="$t_end" \
    'BEGIN { printf ">> image: %s (%s, %.1f MiB), build %.1f s (freeze %.1f s)\n", img, fmt, size / 1048576, t2 - t0, t1 - t0 }'
echo ">> sha256: $(cut -d' ' -f1 "$OUT/$IMGBASE.raw.sha256")"
