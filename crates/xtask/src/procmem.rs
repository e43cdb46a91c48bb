//! Memory of a running VMM process from `/proc/PID/status` and `/proc/PID/smaps`.

/// `VmRSS` and `VmHWM` of `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

/// Parses `/proc/PID/status`. `None` when either field is missing (e.g. a zombie).
pub fn parse_status(text: &str) -> Option<Status> {
    let mut rss = None;
    let mut hwm = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            rss = parse_kb(v);
        } else if let Some(v) = line.strip_prefix("VmHWM:") {
            hwm = parse_kb(v);
        }
    }
    Some(Status {
        rss_kb: rss?,
        hwm_kb: hwm?,
    })
}

/// `"   1234 kB"` -> 1234.
fn parse_kb(v: &str) -> Option<u64> {
    let mut it = v.split_whitespace();
    let n = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then_some(n)
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Pathname column; empty for plain anonymous memory.
    pub path: String,
    pub inode: u64,
    pub rss_kb: u64,
}

impl Mapping {
    pub fn size(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Anonymous memory or a memfd: where a VMM keeps guest RAM.
    pub fn is_anon_like(&self) -> bool {
        (self.inode == 0 && (self.path.is_empty() || self.path.starts_with("[anon")))
            || self.path.starts_with("/memfd:")
    }
}

/// Parses `/proc/PID/smaps`; mappings whose header is malformed are skipped.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
        } else if let Some(v) = line.strip_prefix("Rss:")
            && let (Some(last), Some(kb)) = (out.last_mut(), parse_kb(v))
        {
            last.rss_kb = kb;
        }
    }
    out
}

/// `start-end perms offset dev inode [path]`.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut it = line.split_whitespace();
    let (start, end) = it.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = it.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = it.next()?;
    let dev = it.next()?;
    if !dev.contains(':') {
        return None;
    }
    let inode = it.next()?.parse().ok()?;
    let path = it.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        path,
        inode,
        rss_kb: 0,
    })
}

/// Slack allowed above the guest size when matching the guest RAM mapping (alignment, guard).
const SLACK: u64 = 8 << 20;

/// Resident KiB of the guest RAM: the anonymous mapping (or memfd) whose size is the guest
/// memory size (up to 8 MiB more); with several candidates, the most resident one.
pub fn guest_ram_rss_kb(maps: &[Mapping], guest_bytes: u64) -> Option<u64> {
    maps.iter()
        .filter(|m| m.is_anon_like() && m.size() >= guest_bytes && m.size() <= guest_bytes + SLACK)
        .map(|m| m.rss_kb)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 1234                       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:              131072 kB
Pss:              131072 kB
7f0010000000-7f0010001000 ---p 00000000 00:00 0 
Size:                  4 kB
Rss:                   0 kB
7f0020000000-7f0030000000 rw-s 00000000 00:01 99                         /memfd:other (deleted)
Size:             262144 kB
Rss:                1000 kB
7f0040000000-7f0040200000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                2048 kB
";

    #[test]
    fn status_fields() {
        let s = parse_status("Name:\tx\nVmHWM:\t  5000 kB\nVmRSS:\t  4000 kB\n");
        assert_eq!(
            s,
            Some(Status {
                rss_kb: 4000,
                hwm_kb: 5000
            })
        );
        assert_eq!(parse_status("Name:\tzombie\nState:\tZ\n"), None);
        assert_eq!(parse_status("VmHWM:\t5 MB\nVmRSS:\t4 kB\n"), None);
    }

    #[test]
    fn smaps_mappings_and_rss() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path, "/usr/bin/qemu-system-x86_64");
        assert!(!maps[0].is_anon_like());
        assert_eq!(maps[1].size(), 256 << 20);
        assert_eq!(maps[1].rss_kb, 131072);
        assert!(maps[1].is_anon_like());
        assert_eq!(maps[3].path, "/memfd:other (deleted)");
        assert!(!maps[4].is_anon_like());
    }

    #[test]
    fn guest_ram_found_by_size() {
        let maps = parse_smaps(SMAPS);
        // The anonymous 256 MiB mapping wins over the less resident memfd of the same size.
        assert_eq!(guest_ram_rss_kb(&maps, 256 << 20), Some(131072));
        assert_eq!(guest_ram_rss_kb(&maps, 512 << 20), None);
        assert_eq!(guest_ram_rss_kb(&maps, 250 << 20), Some(131072));
        assert_eq!(guest_ram_rss_kb(&maps, 240 << 20), None);
    }
}
