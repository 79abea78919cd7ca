#!/usr/bin/env bash
# Build the flatcar-overlaybd systemd-sysext image.
#
#   build.sh --flatcar-version 4593.2.5 [--arch x86-64|arm64] [--format erofs|squashfs] [--portable]
#            [--out DIR] [--target-glibc X.Y] [--reuse-bundle]
#   build.sh --bundle-only [--out DIR]            # just the frozen onedir -> OUT/bundle
#   build.sh --print-key --flatcar-version V ...  # the input key a finished image is stored under
#
# Steps: generate protobuf stubs, freeze ONE multi-call executable with PyInstaller (onedir, stripped)
# into OUT/bundle (= the /usr/local/overlaybd tree: overlaybd, _internal/, bin/<tool> symlinks, etc/,
# snapshotter/etc/), stage usr/ (bundle, units, tmpfiles, extension-release), check glibc against the
# target Flatcar release, normalise modes/mtimes, and make OUT/flatcar-overlaybd.raw (erofs lz4hc by
# default, squashfs zstd with --format squashfs). Same inputs + SOURCE_DATE_EPOCH => same bytes.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
NAME=flatcar-overlaybd
FLATCAR_VERSION=""
FORMAT=erofs
PORTABLE=0
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
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --flatcar-version) FLATCAR_VERSION=${2:?}; shift ;;
        --flatcar-version=*) FLATCAR_VERSION=${1#*=} ;;
        --arch) ARCH=${2:?}; shift ;;
        --arch=*) ARCH=${1#*=} ;;
        --format) FORMAT=${2:?}; shift ;;
        --format=*) FORMAT=${1#*=} ;;
        --portable) PORTABLE=1 ;;
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

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH: '$SOURCE_DATE_EPOCH' is not an integer"
export SOURCE_DATE_EPOCH PYTHONHASHSEED=0 LC_ALL=C TZ=UTC
umask 022

tool() { PYTHONPATH="$REPO/python" "$PY" "$REPO/sysext/buildtool.py" "$@"; }
key_args=("$FLATCAR_VERSION" "$ARCH" "$FORMAT" "$PORTABLE" "$TARGET_GLIBC" "$SOURCE_DATE_EPOCH")
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
    tool extension-release --root "$ROOT" --arch "$ARCH" --portable
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
IMG=$OUT/$NAME.raw
rm -f "$IMG.tmp"
echo ">> mkfs ($FORMAT)"
if [ "$FORMAT" = erofs ]; then
    # Fixed UUID and timestamp; erofs-utils 1.5 has no 'fragments' (Flatcar adds -Efragments on >= 1.6).
    uuid=$("$PY" -c 'import sys, uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, "flatcar-overlaybd:" + ":".join(sys.argv[1:])))' \
        "$FLATCAR_VERSION" "$ARCH" "$PORTABLE" "$SOURCE_DATE_EPOCH")
    mkfs.erofs -zlz4hc,12 -C65536 -Eztailpacking -x-1 --all-root -T"$SOURCE_DATE_EPOCH" -U"$uuid" \
        --quiet "$IMG.tmp" "$ROOT"
else
    # mksquashfs takes SOURCE_DATE_EPOCH (exported above) as the fs time and clamps file times to it.
    mksquashfs "$ROOT" "$IMG.tmp" -noappend -all-root -no-xattrs -comp zstd -reproducible \
        -quiet -no-progress >/dev/null
fi
mv -f "$IMG.tmp" "$IMG"
tool listing "$ROOT" > "$OUT/${NAME}_contents.txt"
(cd "$OUT" && sha256sum "$NAME.raw" > "$NAME.raw.sha256")
tool input-key "$REPO" "${key_args[@]}" > "$IMG.key"
t_end=$(date +%s.%N)

echo ">> contents ($OUT/${NAME}_contents.txt):"
cat "$OUT/${NAME}_contents.txt"
echo ">> extension-release:"
sed 's/^/   /' "$ROOT/usr/lib/extension-release.d/extension-release.$NAME"
awk -v img="$IMG" -v fmt="$FORMAT" -v size="$(stat -c %s "$IMG")" -v t0="$t_start" -v t1="$t_bundle" -v t2="$t_end" \
    'BEGIN { printf ">> image: %s (%s, %.1f MiB), build %.1f s (freeze %.1f s)\n", img, fmt, size / 1048576, t2 - t0, t1 - t0 }'
echo ">> sha256: $(cut -d' ' -f1 "$OUT/$NAME.raw.sha256")"
