#!/bin/sh
# anyvisor test guest /init (busybox sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
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

# The ACPI power button (docs/platform.md): the `button` module turns the host's press
# (`anyvisor shutdown`, SIGTERM) into a KEY_POWER input event, for which busybox acpid runs
# /etc/acpi/PWRF/00000080: an orderly power-off, or with /run/anyvisor-ignore-power-button
# (test `ignore-power-button`) nothing.
mkdir -p /etc/acpi/PWRF
cat > /etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
if [ -e /run/anyvisor-ignore-power-button ]; then
    echo "ANYVISOR-POWER-BUTTON ignored" > /dev/console
    exit 0
fi
echo "ANYVISOR-POWER-BUTTON pressed" > /dev/console
kill -TERM -1 2>/dev/null
sync
echo "ANYVISOR-POWEROFF orderly" > /dev/console
poweroff -f
EOF
chmod 0755 /etc/acpi/PWRF/00000080
n=0
while [ ! -e /dev/input/event0 ] && [ "$n" -lt 20 ]; do sleep 0.1; n=$((n + 1)); done
if [ -e /dev/input/event0 ]; then
    # In the foreground of a background job, so that its pid is known: INIT-OK only once it
    # holds the input device (a press before that would be lost).
    acpid -f -c /etc/acpi -l /dev/null &
    n=0
    while ! ls -l "/proc/$!/fd" 2>/dev/null | grep -q /dev/input/event && [ "$n" -lt 50 ]; do
        sleep 0.1; n=$((n + 1))
    done
else
    echo "ANYVISOR-POWER-BUTTON absent"
fi

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
    idle)
        # Runs until the host's power button (or a forced stop) ends it.
        echo "ANYVISOR-IDLE"
        while :; do sleep 3600; done ;;
    ignore-power-button)
        touch /run/anyvisor-ignore-power-button
        echo "ANYVISOR-IDLE"
        while :; do sleep 3600; done ;;
    panic)
        # A kernel panic on purpose (sysrq 'c'); with panic=-1 the guest then resets.
        echo c > /proc/sysrq-trigger ;;
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
    memwork-disk)
        # memwork-bg plus the disk workload on the host-given raw disk /dev/vda.
        /bin/memwork &
        /bin/diskwork /dev/vda &
        interactive ;;
    blkbench)
        /bin/blkbench /dev/vda
        poweroff -f ;;
    hotloop)
        # Bignum-style hot loops with a known instruction count (cargo xtask bench hotloop).
        /bin/hotloop
        poweroff -f ;;
    faults)
        for k in ud pf de; do
            /bin/faults "$k" 2>/dev/null
            report_fault "$k" "$?"
        done
        poweroff -f ;;
    devices)
        # All disk and rng checks in one boot (crates/cli/tests/e2e/devices.rs).
        echo "ANYVISOR-DEVS $(ls /sys/bus/virtio/devices | wc -l)"
        for b in /sys/block/vd*; do
            [ -e "$b" ] || continue
            d="${b##*/}"
            echo "ANYVISOR-DISK-INFO $d $(cat "$b/size") $(cat "$b/ro")"
            echo "ANYVISOR-DISK $d $(dd if="/dev/$d" bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
        done
        # 4 MiB of "1\n2\n3\n..." written to vdb, flushed, read back past the page cache.
        if [ -b /dev/vdb ]; then
            seq 1 1000000 | head -c 4194304 > /tmp/pattern
            if dd if=/tmp/pattern of=/dev/vdb bs=1M conv=fsync 2>/dev/null && sync; then
                echo 3 > /proc/sys/vm/drop_caches
                echo "ANYVISOR-WROTE vdb $(dd if=/dev/vdb bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
            else
                echo "ANYVISOR-WROTE vdb failed"
            fi
        fi
        if [ -b /dev/vdc ]; then
            if dd if=/tmp/pattern of=/dev/vdc bs=4k count=1 conv=fsync 2>/dev/null; then
                echo "ANYVISOR-RO vdc ALLOWED"
            else
                echo "ANYVISOR-RO vdc refused"
            fi
        fi
        if [ -c /dev/hwrng ]; then
            echo "ANYVISOR-RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
            echo "ANYVISOR-RNG $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
        else
            echo "ANYVISOR-RNG none"
        fi
        poweroff -f ;;
    net)
        # Host side: 10.0.0.1 in a network namespace; port 8000 sends a blob and closes, port
        # 8001 takes it back. (busybox-static's wget segfaults even on the host, so nc.)
        echo "ANYVISOR-MAC $(cat /sys/class/net/eth0/address 2>/dev/null)"
        ip link set lo up
        ip link set eth0 up
        ip addr add 10.0.0.2/24 dev eth0
        if ping -c 3 -W 5 10.0.0.1 >/dev/null 2>&1; then
            echo "ANYVISOR-PING ok"
        else
            echo "ANYVISOR-PING fail"
        fi
        if timeout 120 nc 10.0.0.1 8000 < /dev/null > /tmp/net-in && [ -s /tmp/net-in ]; then
            echo "ANYVISOR-NET-SHA $(sha256sum < /tmp/net-in | cut -d' ' -f1)"
            if timeout 120 nc 10.0.0.1 8001 < /tmp/net-in > /dev/null; then
                echo "ANYVISOR-NET-SENT ok"
            else
                echo "ANYVISOR-NET-SENT fail"
            fi
        else
            echo "ANYVISOR-NET-SHA fail"
        fi
        poweroff -f ;;
    vsock)
        # Host -> guest: the host connects to port 5000 and gets its bytes echoed.
        vsockcat listen 5000 echo &
        LPID=$!
        sleep 1
        echo "ANYVISOR-VSOCK-LISTENING 5000"
        if wait "$LPID"; then
            echo "ANYVISOR-VSOCK-ECHO ok"
        else
            echo "ANYVISOR-VSOCK-ECHO fail"
        fi
        # Guest -> host: 1 MiB of "1\n2\n..." to the host's port 6000, which echoes it back.
        seq 1 1000000 | head -c 1048576 > /tmp/vs-out
        if vsockcat connect 2 6000 < /tmp/vs-out > /tmp/vs-back; then
            echo "ANYVISOR-VSOCK-BACK $(sha256sum < /tmp/vs-back | cut -d' ' -f1)"
        else
            echo "ANYVISOR-VSOCK-BACK fail"
        fi
        poweroff -f ;;
    *)
        interactive ;;
esac
# not reached normally
poweroff -f
