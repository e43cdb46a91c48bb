#!/usr/bin/env bash
# Build the anyvisor "real distribution" guest into guest/out/:
#   debian.img           raw disk, GPT, one ext4 partition holding a Debian 12 (bookworm) minbase
#                        userland + python3, gcc, libc6-dev, openssl, xz-utils and the Debian cloud
#                        kernel (linux-image-cloud-amd64) with its initramfs-tools initrd
#   debian-vmlinuz       that kernel, debian-initrd.img that initrd (for `run --kernel/--initrd`)
#   debian-grub.cfg      a copy of the image's /boot/grub/grub.cfg (the kernel command line)
#   debian-expected.txt  `<step> <sha256>` of every workload step, computed on this host
#   debian-info          kernel version, file system UUID, package versions
# See guest/README.md ("Debian distro image"). Needs Debian 12, root, apt sources.
# Idempotent: the debootstrap'ed tree and its .debs are cached under guest/out/cache; the image
# is rebuilt only when this script, guest/distro/* or the cached tree changed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"
CACHE="$OUT/cache"
SRC="$HERE/distro"
ROOTFS="$CACHE/debian-rootfs"
DEBS="$CACHE/debian-debs"
IMG="$OUT/debian.img"
SUITE=bookworm
SIZE_MIB="${ANYVISOR_DISTRO_SIZE_MIB:-1536}"
PACKAGES=python3,gcc,libc6-dev,openssl,xz-utils,coreutils,linux-image-cloud-amd64,initramfs-tools
SHARE_DIR=usr/local/share/anyvisor-distro
mkdir -p "$OUT" "$CACHE" "$DEBS"

T0=$(date +%s)
log() { echo "[build-distro $(($(date +%s) - T0))s] $*" >&2; }
die() { echo "[build-distro] ERROR: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || die "must run as root (debootstrap, chroot)"

# ---------------------------------------------------------------- tools
# Waits for another apt/dpkg (DPkg::Lock::Timeout) instead of failing on its lock.
apt_install() {
    local i
    for i in 1 2 3; do
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
            --no-install-recommends "$@" >/dev/null; then
            return 0
        fi
        apt-get -o DPkg::Lock::Timeout=900 update -qq >/dev/null 2>&1 || sleep 20
    done
    die "apt-get install $* failed"
}
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v blkid >/dev/null || need+=(util-linux)
command -v sha256sum >/dev/null || need+=(coreutils)
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt_install "${need[@]}"
fi

# ---------------------------------------------------------------- mirror
# The mirror apt is configured with for bookworm main (apt's own view of its sources), or
# ANYVISOR_DEBIAN_MIRROR.
mirror() {
    if [[ -n "${ANYVISOR_DEBIAN_MIRROR:-}" ]]; then
        echo "$ANYVISOR_DEBIAN_MIRROR"
        return
    fi
    apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT) $(TARGET_OF)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s && $3 == "main" && $4 == "deb" { print $1; exit }'
}
MIRROR="$(mirror)"
if [[ -z "$MIRROR" ]]; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq >/dev/null 2>&1 || true
    MIRROR="$(mirror)"
fi
[[ -n "$MIRROR" ]] || die "apt has no '$SUITE main' source; set ANYVISOR_DEBIAN_MIRROR=<url>"

# ---------------------------------------------------------------- up to date?
INPUTS_HASH="$( (cat "${BASH_SOURCE[0]}"; cat "$SRC"/*; echo "$SIZE_MIB $PACKAGES $SUITE") \
    | sha256sum | cut -c1-16)"
STAMP="$OUT/.debian-img-$INPUTS_HASH"
ROOTFS_STAMP="$CACHE/.debian-rootfs-$(echo "$PACKAGES $SUITE" | sha256sum | cut -c1-16)"
if [[ -e "$STAMP" && -e "$ROOTFS_STAMP" && -s "$IMG" && -s "$OUT/debian-vmlinuz" \
      && -s "$OUT/debian-initrd.img" && -s "$OUT/debian-expected.txt" ]]; then
    log "debian.img is up to date ($STAMP)"
    exit 0
fi

# ---------------------------------------------------------------- debootstrap
# Anything debootstrap left mounted in the tree (after a failed run) is unmounted before the
# tree is removed; rm never crosses into another file system.
unmount_tree() {
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$ROOTFS/" | sort -r); do
        umount -l "$m" || true
    done
}
if [[ ! -e "$ROOTFS_STAMP" ]]; then
    unmount_tree
    rm -rf --one-file-system "$ROOTFS" "$CACHE"/.debian-rootfs-*
    log "debootstrap --variant=minbase $SUITE from $MIRROR (+ $PACKAGES)"
    if ! debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$DEBS" \
            "$SUITE" "$ROOTFS" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1; then
        unmount_tree
        tail -n 30 "$CACHE/debootstrap.log" >&2
        [[ -f "$ROOTFS/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
    unmount_tree
    # No downloaded package lists or .debs in the image (the .debs stay in $DEBS).
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*_Packages \
        "$ROOTFS"/var/cache/apt/*.bin
    touch "$ROOTFS_STAMP"
    log "debootstrap done"
else
    log "using the cached tree $ROOTFS"
fi

# ---------------------------------------------------------------- kernel and initrd
KVER="$(cd "$ROOTFS/boot" && ls -1 vmlinuz-* 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n1)"
[[ -n "$KVER" ]] || die "no /boot/vmlinuz-* in the tree (linux-image-cloud-amd64 not installed?)"
if [[ ! -s "$ROOTFS/boot/initrd.img-$KVER" ]]; then
    log "update-initramfs -c -k $KVER (the kernel's postinst made none)"
    chroot "$ROOTFS" update-initramfs -c -k "$KVER" >/dev/null
fi
[[ -s "$ROOTFS/boot/initrd.img-$KVER" ]] || die "initramfs-tools made no /boot/initrd.img-$KVER"
# linux-base makes these links on a normal install; make sure they are there.
for l in vmlinuz:vmlinuz initrd.img:initrd.img; do
    name="${l%%:*}"
    [[ -L "$ROOTFS/$name" ]] || ln -sfn "boot/$name-$KVER" "$ROOTFS/$name"
done
log "kernel $KVER"

# ---------------------------------------------------------------- the image's own files
# UUIDs derived from the inputs: a rebuild of the same inputs keeps root=UUID= (and the command
# lines of anything that boots the image) unchanged.
uuid_of() {
    local h
    h="$(echo "$1 $INPUTS_HASH" | sha256sum)"
    echo "${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"
}
UUID="$(uuid_of filesystem)"
DISK_GUID="$(uuid_of disk)"
PART_UUID="$(uuid_of partition)"

install -d "$ROOTFS/$SHARE_DIR"
install -m 0755 "$SRC/anyvisor-distro-init" "$SRC/anyvisor-distro" "$ROOTFS/usr/local/bin/"
install -m 0644 "$SRC/work.py" "$SRC/prog.c" "$SRC/gendata.py" "$ROOTFS/$SHARE_DIR/"
# The workload's input, made by the image's own python3 from a fixed seed.
chroot "$ROOTFS" python3 "/$SHARE_DIR/gendata.py" "/$SHARE_DIR/data.bin" 262144

cat > "$ROOTFS/etc/fstab" <<FSTAB
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=$UUID / ext4 errors=remount-ro 0 1
FSTAB
echo anyvisor-debian > "$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tanyvisor-debian\n' > "$ROOTFS/etc/hosts"
# root logs in on the console without a password.
chroot "$ROOTFS" passwd -d root >/dev/null

CMDLINE="root=UUID=$UUID ro console=ttyS0"
install -d "$ROOTFS/boot/grub"
# The layout of a grub-mkconfig output (00_header, 10_linux), for this one kernel.
cat > "$ROOTFS/boot/grub/grub.cfg" <<GRUB
#
# Written by anyvisor's guest/build-distro.sh in the layout grub-mkconfig produces on Debian
# (/etc/grub.d/00_header and 10_linux) for the one installed kernel.
#

### BEGIN /etc/grub.d/00_header ###
if [ -s \$prefix/grubenv ]; then
  load_env
fi
set default="0"
if [ x"\${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
terminal_input console
terminal_output console
set timeout=5
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
function gfxmode {
	set gfxpayload="\${1}"
}
set linux_gfx_mode=
export linux_gfx_mode
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os \$menuentry_id_option 'gnulinux-simple-$UUID' {
	load_video
	insmod gzio
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root $UUID
	echo	'Loading Linux $KVER ...'
	linux	/boot/vmlinuz-$KVER $CMDLINE
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-$KVER
}
### END /etc/grub.d/10_linux ###
GRUB

# Nothing in the image's configuration or scripts may steer glibc's CPU dispatch.
if grep -rIl GLIBC_TUNABLES "$ROOTFS/etc" "$ROOTFS/usr/local" "$ROOTFS/root" "$ROOTFS/boot/grub" \
        2>/dev/null; then
    die "GLIBC_TUNABLES found in the image (files above)"
fi

# ---------------------------------------------------------------- expected checksums
# The workload run once on this host, in the image's tree with the image's own binaries; the
# steps whose result is the input itself are also checked against the host's sha256sum and, for
# the ciphertext, the host's openssl.
log "computing the expected checksums (the workload once, in a chroot)"
rm -rf "$ROOTFS/tmp/anyvisor-expect"
chroot "$ROOTFS" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    ANYVISOR_DISTRO_WORK=/tmp/anyvisor-expect /usr/local/bin/anyvisor-distro once \
    > "$CACHE/debian-expect.log"
rm -rf "$ROOTFS/tmp/anyvisor-expect"
STEPS="$(chroot "$ROOTFS" /usr/local/bin/anyvisor-distro steps)"
DATA_SHA="$(sha256sum "$ROOTFS/$SHARE_DIR/data.bin" | cut -d' ' -f1)"
{
    echo "# anyvisor distro workload: <step> <sha256> (guest/build-distro.sh, kernel $KVER)"
    for s in $STEPS; do
        sum="$(awk -v s="$s" '$1 == "DISTRO" && $2 == s && $3 == 1 { print $4 }' "$CACHE/debian-expect.log")"
        [[ "$sum" =~ ^[0-9a-f]{64}$ ]] || { cat "$CACHE/debian-expect.log" >&2; die "step $s failed on the host"; }
        case "$s" in
            openssl-dec|xz|sha256sum)
                [[ "$sum" == "$DATA_SHA" ]] || die "step $s: $sum, but data.bin is $DATA_SHA" ;;
            openssl-enc)
                if command -v openssl >/dev/null; then
                    host="$(openssl enc -aes-256-cbc -K 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f \
                        -iv f0e0d0c0b0a090807060504030201000 -in "$ROOTFS/$SHARE_DIR/data.bin" | sha256sum | cut -d' ' -f1)"
                    [[ "$sum" == "$host" ]] || die "step $s: $sum in the tree, $host with the host's openssl"
                fi ;;
        esac
        echo "$s $sum"
    done
} > "$OUT/debian-expected.txt.tmp"
grep '^DISTRO-TIME' "$CACHE/debian-expect.log" | sed 's/^/[host] /' >&2 || true

# ---------------------------------------------------------------- the disk
# GPT: one Linux file system partition from 1 MiB, 4 KiB aligned, ending before the backup GPT.
SECTORS=$((SIZE_MIB * 2048))
PART_START=2048
PART_SECTORS=$(( (SECTORS - PART_START - 34) / 8 * 8 ))
log "making a ${SIZE_MIB} MiB GPT disk with an ext4 file system (UUID $UUID)"
rm -f "$IMG.tmp"
truncate -s "${SIZE_MIB}M" "$IMG.tmp"
sfdisk --quiet --no-reread --no-tell-kernel "$IMG.tmp" <<SFDISK
label: gpt
label-id: $DISK_GUID
first-lba: 2048
start=$PART_START, size=$PART_SECTORS, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$PART_UUID, name="debian-root"
SFDISK
mkfs.ext4 -q -F -L debian-root -U "$UUID" -b 4096 -d "$ROOTFS" \
    -E "offset=$((PART_START * 512)),nodiscard,root_owner=0:0" "$IMG.tmp" $((PART_SECTORS / 8))
found="$(blkid -p -O $((PART_START * 512)) -s UUID -o value "$IMG.tmp" || true)"
[[ "$found" == "$UUID" ]] || die "the file system at 1 MiB has UUID '$found', not $UUID"
e2fsck -fn "$IMG.tmp?offset=$((PART_START * 512))" >/dev/null 2>&1 \
    || log "warning: e2fsck of the new file system reported problems"

install -m 0644 "$ROOTFS/boot/vmlinuz-$KVER" "$OUT/debian-vmlinuz.tmp"
install -m 0644 "$ROOTFS/boot/initrd.img-$KVER" "$OUT/debian-initrd.img.tmp"
install -m 0644 "$ROOTFS/boot/grub/grub.cfg" "$OUT/debian-grub.cfg.tmp"
{
    echo "kernel_version=$KVER"
    echo "root_uuid=$UUID"
    echo "cmdline=$CMDLINE"
    echo "mirror=$MIRROR"
    echo "size_mib=$SIZE_MIB"
    chroot "$ROOTFS" dpkg-query -W -f='package=${Package} ${Version}\n' \
        python3 gcc libc6 openssl xz-utils coreutils initramfs-tools "linux-image-$KVER" 2>/dev/null || true
} > "$OUT/debian-info.tmp"
for f in debian-vmlinuz debian-initrd.img debian-grub.cfg debian-expected.txt debian-info; do
    mv "$OUT/$f.tmp" "$OUT/$f"
done
mv "$IMG.tmp" "$IMG"
rm -f "$OUT"/.debian-img-*
touch "$STAMP"

log "done in $(($(date +%s) - T0)) s"
echo "debian.img:   $IMG ($(du -h --apparent-size "$IMG" | cut -f1) apparent, $(du -h "$IMG" | cut -f1) allocated)"
echo "kernel:       $KVER ($OUT/debian-vmlinuz, $OUT/debian-initrd.img)"
echo "cmdline:      $CMDLINE"
echo "expected:     $OUT/debian-expected.txt"
