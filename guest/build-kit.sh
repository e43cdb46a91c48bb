#!/usr/bin/env bash
# Build the anyvisor test guest kit into guest/out/:
#   bzImage, vmlinux, initramfs.cpio.gz
# Needs: Debian 12, root (for apt-get install of missing tools), apt sources.
# Idempotent: downloaded/unpacked packages are cached under guest/out/cache.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# ANYVISOR_KIT_OUT builds elsewhere (e.g. to try a changed init.sh without touching guest/out).
OUT="${ANYVISOR_KIT_OUT:-$HERE/out}"
CACHE="$OUT/cache"
SRC="$HERE/src"
# apt_get: apt-get that waits (bounded) for another apt/dpkg to release its lock.
# shellcheck source=../scripts/apt-wait.sh
. "$HERE/../scripts/apt-wait.sh"
mkdir -p "$OUT" "$CACHE/debs"

log() { echo "[build-kit] $*" >&2; }
die() { echo "[build-kit] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
need_pkgs=()
command -v lz4 >/dev/null || need_pkgs+=(lz4)
{ command -v readelf && command -v objcopy; } >/dev/null || need_pkgs+=(binutils)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v gcc >/dev/null || need_pkgs+=(gcc libc6-dev)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v zstd >/dev/null || need_pkgs+=(zstd)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    apt_get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# fetch_deb PKG -> prints path of cached .deb
fetch_deb() {
    local pkg="$1" f
    f="$(ls -1 "$CACHE/debs/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)"
    if [[ -z "$f" ]]; then
        log "downloading $pkg"
        (cd "$CACHE/debs" && apt_get download -q "$pkg" >/dev/null 2>&1) \
            || { apt_get update -qq >/dev/null 2>&1 || true; (cd "$CACHE/debs" && apt_get download -q "$pkg" >/dev/null); } \
            || die "apt-get download $pkg failed"
        f="$(ls -1 "$CACHE/debs/${pkg}_"*.deb | sort -V | tail -n1)"
    fi
    echo "$f"
}

# unpack_deb DEB DIR (skipped if DIR/.unpacked exists)
unpack_deb() {
    local deb="$1" dir="$2"
    if [[ ! -e "$dir/.unpacked" ]]; then
        rm -rf "$dir"; mkdir -p "$dir"
        dpkg -x "$deb" "$dir"
        touch "$dir/.unpacked"
    fi
}

# ---------------------------------------------------------------- kernel
KPKG="${ANYVISOR_KERNEL_PKG:-}"
if [[ -z "$KPKG" ]]; then
    KPKG="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' \
            | awk '{print $1}' | sort -V | tail -n1)"
    if [[ -z "$KPKG" ]]; then
        apt_get update -qq >/dev/null 2>&1 || true
        KPKG="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' \
                | awk '{print $1}' | sort -V | tail -n1)"
    fi
fi
[[ -n "$KPKG" ]] || die "no linux-image-6.1.0-*-cloud-amd64-unsigned package found"
log "kernel package: $KPKG"
KDEB="$(fetch_deb "$KPKG")"
KDIR="$CACHE/$(basename "$KDEB" .deb)"
unpack_deb "$KDEB" "$KDIR"

VMLINUZ="$(ls -1 "$KDIR"/boot/vmlinuz-* | head -n1)"
[[ -f "$VMLINUZ" ]] || die "no boot/vmlinuz-* in $KDEB"
KVER="${VMLINUZ##*/vmlinuz-}"
KCONFIG="$KDIR/boot/config-$KVER"
MODROOT="$KDIR/lib/modules/$KVER"
[[ -f "$KCONFIG" && -d "$MODROOT" ]] || die "kernel package layout unexpected ($KVER)"
log "kernel version: $KVER"

cmp -s "$VMLINUZ" "$OUT/bzImage" 2>/dev/null || install -m 0644 "$VMLINUZ" "$OUT/bzImage"

# ---------------------------------------------------------------- vmlinux
# Like linux/scripts/extract-vmlinux, specialised for legacy LZ4 (Debian).
extract_vmlinux() {
    local img="$1" dst="$2" off tmp
    tmp="$dst.tmp"
    rm -f "$tmp"
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$img" | cut -d: -f1); do
        # lz4 complains about trailing garbage after the legacy frame; ignore
        # its status and validate the output instead.
        tail -c+$((off + 1)) "$img" | lz4 -dc > "$tmp" 2>/dev/null || true
        if readelf -h "$tmp" 2>/dev/null | grep -q 'Class:.*ELF64' &&
           readelf -h "$tmp" | grep -q 'Machine:.*X86-64' &&
           readelf -h "$tmp" | grep -q 'Type:.*EXEC'; then
            mv "$tmp" "$dst"
            return 0
        fi
    done
    rm -f "$tmp"
    return 1
}
if [[ ! -s "$OUT/vmlinux" || "$OUT/vmlinux" -ot "$OUT/bzImage" || ! -e "$OUT/.vmlinux-$KVER" ]]; then
    log "extracting vmlinux"
    rm -f "$OUT"/.vmlinux-* "$OUT/vmlinux"
    extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux" \
        || die "could not extract an ELF64 x86-64 vmlinux from bzImage (not legacy LZ4?)"
    touch "$OUT/.vmlinux-$KVER"
fi
readelf -h "$OUT/vmlinux" | grep -q 'Machine:.*X86-64' || die "vmlinux is not x86-64 ELF"

# ---------------------------------------------------------------- busybox
BBDEB="$(fetch_deb busybox-static)"
BBDIR="$CACHE/$(basename "$BBDEB" .deb)"
unpack_deb "$BBDEB" "$BBDIR"
BUSYBOX="$BBDIR/bin/busybox"
[[ -x "$BUSYBOX" ]] || die "busybox binary missing in $BBDEB"

# ---------------------------------------------------------------- guest programs
BIN="$OUT/guest-bin"
mkdir -p "$BIN"
for prog in memwork faults vsockcat blkbench diskwork hotloop; do
    if [[ ! -x "$BIN/$prog" || "$SRC/$prog.c" -nt "$BIN/$prog" ]]; then
        log "compiling $prog"
        gcc -O2 -static -Wall -o "$BIN/$prog" "$SRC/$prog.c"
    fi
done

# ---------------------------------------------------------------- initramfs
ROOT="$OUT/initramfs-root"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,lib/modules}
chmod 1777 "$ROOT/tmp"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
    [[ -z "$applet" || "$applet" == bin/busybox ]] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    [[ -e "$ROOT/$applet" ]] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)
install -m 0755 "$BIN/memwork" "$BIN/faults" "$BIN/vsockcat" "$BIN/blkbench" "$BIN/diskwork" "$BIN/hotloop" "$ROOT/bin/"

# Kernel modules: wanted module -> Kconfig symbol. Built-in (=y) ones are skipped.
declare -A WANT_CFG=(
    [virtio_mmio]=CONFIG_VIRTIO_MMIO
    [virtio_blk]=CONFIG_VIRTIO_BLK
    [virtio_net]=CONFIG_VIRTIO_NET
    [vsock]=CONFIG_VSOCKETS
    [vmw_vsock_virtio_transport_common]=CONFIG_VIRTIO_VSOCKETS_COMMON
    [vmw_vsock_virtio_transport]=CONFIG_VIRTIO_VSOCKETS
    [virtio_rng]=CONFIG_HW_RANDOM_VIRTIO
    [virtio_pci]=CONFIG_VIRTIO_PCI
    [evdev]=CONFIG_INPUT_EVDEV
    [button]=CONFIG_ACPI_BUTTON
)
# evdev and button: the ACPI power button as an input event for busybox acpid (init.sh).
WANT_ORDER=(virtio_mmio virtio_blk virtio_net vsock vmw_vsock_virtio_transport_common
            vmw_vsock_virtio_transport virtio_rng virtio_pci evdev button)

# The .deb ships no modules.dep (depmod runs at install time) and kmod may be
# absent, so read "depends=" from each module's .modinfo section with objcopy.
declare -A MOD_PATH=()
while IFS= read -r path; do
    name="$(basename "$path")"; name="${name%%.ko*}"; name="${name//-/_}"
    MOD_PATH[$name]="$path"
done < <(cd "$MODROOT" && find kernel -name '*.ko*' | LC_ALL=C sort)

# mod_file NAME DST: write the uncompressed module to DST
mod_file() {
    local src="$MODROOT/${MOD_PATH[$1]}"
    case "$src" in
        *.ko)     cp "$src" "$2" ;;
        *.ko.xz)  xz -dc "$src" > "$2" ;;
        *.ko.zst) zstd -qdc "$src" > "$2" ;;
        *.ko.gz)  gzip -dc "$src" > "$2" ;;
        *) die "unknown module format: $src" ;;
    esac
}
MODTMP="$OUT/modtmp"
rm -rf "$MODTMP"; mkdir -p "$MODTMP"
mod_deps() {
    local f="$MODTMP/$1.ko"
    [[ -f "$f" ]] || mod_file "$1" "$f"
    objcopy -O binary --only-section=.modinfo "$f" "$f.info"
    tr '\0' '\n' < "$f.info" | sed -n 's/^depends=//p' | tr ',' ' '
}

declare -A SEEN=()
LOAD_ORDER=()
add_mod() { # post-order DFS => dependencies first
    local name="$1" d dn
    [[ -n "${SEEN[$name]:-}" ]] && return 0
    SEEN[$name]=1
    [[ -n "${MOD_PATH[$name]:-}" ]] || { log "warning: module $name not found"; return 0; }
    for d in $(mod_deps "$name"); do
        add_mod "${d//-/_}"
    done
    LOAD_ORDER+=("$name")
}
BUILTIN=() MODULAR=() ABSENT=()
for m in "${WANT_ORDER[@]}"; do
    cfg="${WANT_CFG[$m]}"
    val="$(grep -E "^${cfg}=" "$KCONFIG" | cut -d= -f2 || true)"
    case "$val" in
        y) BUILTIN+=("$m") ;;
        m) if [[ -n "${MOD_PATH[$m]:-}" ]]; then MODULAR+=("$m"); add_mod "$m"
           else ABSENT+=("$m"); fi ;;
        *) ABSENT+=("$m") ;;
    esac
done
log "virtio built-in: ${BUILTIN[*]:-none}"
log "virtio modules:  ${MODULAR[*]:-none}"
((${#ABSENT[@]})) && log "not available:   ${ABSENT[*]}"

: > "$ROOT/etc/modules.order"
for name in "${LOAD_ORDER[@]}"; do
    [[ -f "$MODTMP/$name.ko" ]] || mod_file "$name" "$MODTMP/$name.ko"
    cp "$MODTMP/$name.ko" "$ROOT/lib/modules/$name.ko"
    echo "$name" >> "$ROOT/etc/modules.order"
done
log "module load order: $(tr '\n' ' ' < "$ROOT/etc/modules.order")"
rm -rf "$MODTMP"

cat > "$ROOT/etc/kit-info" <<INFO
kernel_package=$KPKG
kernel_version=$KVER
builtin=${BUILTIN[*]:-}
modules=${MODULAR[*]:-}
load_order=$(tr '\n' ' ' < "$ROOT/etc/modules.order")
INFO

install -m 0755 "$SRC/init.sh" "$ROOT/init"

(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
cp "$ROOT/etc/kit-info" "$OUT/kit-info"

echo "kernel:    $KVER ($KPKG)"
echo "bzImage:   $OUT/bzImage"
echo "vmlinux:   $OUT/vmlinux"
echo "initramfs: $OUT/initramfs.cpio.gz"
