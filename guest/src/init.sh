#!/bin/sh
# anyvisor test guest /init (busybox sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Keep glibc's string functions inside the portable CPU model (x86-64-v2). Under KVM's PVM
# flavour user-mode `cpuid`/`xgetbv` report the host (AVX2, AVX-512), so glibc would otherwise
# pick AVX/EVEX variants that a move to the emu backend cannot run (docs/kvm-platform.md).
export GLIBC_TUNABLES=glibc.cpu.hwcaps=-XSAVE,-XSAVEC,-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-BMI1,-BMI2,-LZCNT,-MOVBE
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null

CMDLINE="$(cat /proc/cmdline)"

# Load virtio modules in dependency order. Module parameters given on the
# kernel command line as <module>.<param>=<value> (e.g.
# virtio_mmio.device=4K@0xd0000000:5) are passed to insmod, like modprobe would.
if [ -f /etc/modules.order ]; then
    while read -r m; do
        [ -f "/lib/modules/$m.ko" ] || continue
        params=""
        for tok in $CMDLINE; do
            case "$tok" in
                "$m".*=*) params="$params ${tok#"$m".}" ;;
            esac
        done
        # shellcheck disable=SC2086
        insmod "/lib/modules/$m.ko" $params 2>/dev/null
    done < /etc/modules.order
fi

hostname anyvisor-guest 2>/dev/null
echo "ANYVISOR-INIT-OK"

TEST=""
for tok in $CMDLINE; do
    case "$tok" in
        anyvisor.test=*) TEST="${tok#anyvisor.test=}" ;;
    esac
done

interactive() {
    setsid cttyhack sh -l 2>/dev/null || sh
    poweroff -f
}

# report KIND STATUS: prints the signal number if killed by a signal (>128).
report_fault() {
    if [ "$2" -gt 128 ]; then
        echo "ANYVISOR-FAULT $1 $(($2 - 128))"
    else
        echo "ANYVISOR-FAULT $1 exit$2"
    fi
}

case "$TEST" in
    poweroff)
        poweroff -f ;;
    reboot)
        reboot -f ;;
    cpus)
        echo "ANYVISOR-CPUS $(grep -c '^processor' /proc/cpuinfo)"
        echo "ANYVISOR-MEM $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
        poweroff -f ;;
    memwork)
        /bin/memwork
        poweroff -f ;;
    memwork-bg)
        /bin/memwork &
        interactive ;;
    blkbench)
        /bin/blkbench /dev/vda
        poweroff -f ;;
    faults)
        for k in ud pf de; do
            /bin/faults "$k" 2>/dev/null
            report_fault "$k" "$?"
        done
        poweroff -f ;;
    *)
        interactive ;;
esac
# not reached normally
poweroff -f
