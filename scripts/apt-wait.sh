# Sourced by scripts/setup.sh and guest/build-kit.sh.
#
# apt_get ARGS...: `apt-get ARGS...`, but when another apt or dpkg holds the package database
# or list locks (a boot-time unattended upgrade, a second setup run), it says so and waits for
# it instead of failing at once: at most ANYVISOR_APT_LOCK_WAIT seconds (default 600), then
# it fails with apt's own message.
apt_get() {
    local limit="${ANYVISOR_APT_LOCK_WAIT:-600}" waited=0 rc err
    err="$(mktemp)"
    while :; do
        rc=0
        apt-get "$@" 2>"$err" || rc=$?
        if [ "$rc" -ne 0 ] && [ "$waited" -lt "$limit" ] &&
            grep -qE 'Could not get lock|Unable to acquire the dpkg frontend lock|Unable to lock directory' "$err"; then
            if [ "$waited" -eq 0 ]; then
                echo "apt: another apt/dpkg holds its lock ($(grep -m1 -oE 'held by process [0-9]+( \([^)]*\))?' "$err" || echo 'process unknown')); waiting for it, at most ${limit}s" >&2
            fi
            sleep 5
            waited=$((waited + 5))
            continue
        fi
        if [ "$rc" -ne 0 ] && [ "$waited" -ge "$limit" ]; then
            echo "apt: gave up waiting ${limit}s for the apt/dpkg lock" >&2
        fi
        cat "$err" >&2
        rm -f "$err"
        [ "$waited" -gt 0 ] && [ "$rc" -eq 0 ] && echo "apt: lock free after ${waited}s" >&2
        return "$rc"
    done
}
