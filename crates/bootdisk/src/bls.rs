//! Boot Loader Spec type #1 entries (`/loader/entries/*.conf`, uapi-group.org/specifications/
//! specs/boot_loader_specification): `title`, `version`, `linux`, `initrd` (repeatable),
//! `options` (repeatable, joined), `sort-key`. Fedora's entries may say `options $kernelopts`;
//! as GRUB's `blscfg` does, `$name` is expanded from `grubenv`.
//!
//! The default is the entry named by `grubenv`'s `saved_entry` (Fedora's `grub2-set-default`),
//! else the first in the spec's order: entries with a `sort-key` first (ascending), then by
//! version, newest first.
//!
//! Written by hand: the format is `key value` lines; no crate on crates.io parses it.

use std::cmp::Ordering;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlsEntry {
    /// The file name without `.conf`.
    pub id: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub sort_key: Option<String>,
    pub linux: Option<String>,
    pub initrds: Vec<String>,
    pub options: String,
}

impl BlsEntry {
    pub fn display(&self) -> String {
        match &self.title {
            Some(t) => format!("{t} ({})", self.id),
            None => self.id.clone(),
        }
    }
}

/// One entry file. `vars` expands `$name` in `options` (from grubenv).
pub fn parse_entry(id: &str, text: &str, vars: &[(String, String)]) -> BlsEntry {
    let mut e = BlsEntry {
        id: id.to_string(),
        title: None,
        version: None,
        sort_key: None,
        linux: None,
        initrds: Vec::new(),
        options: String::new(),
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, v)) => (k, v.trim()),
            None => (line, ""),
        };
        match key {
            "title" => e.title = Some(value.to_string()),
            "version" => e.version = Some(value.to_string()),
            "sort-key" => e.sort_key = Some(value.to_string()),
            "linux" => e.linux = Some(value.to_string()),
            "initrd" => e.initrds.extend(value.split_whitespace().map(String::from)),
            "options" => {
                if !e.options.is_empty() {
                    e.options.push(' ');
                }
                e.options.push_str(&expand(value, vars));
            }
            _ => {}
        }
    }
    e.options = e.options.split_whitespace().collect::<Vec<_>>().join(" ");
    e
}

fn expand(text: &str, vars: &[(String, String)]) -> String {
    text.split_whitespace()
        .map(|w| match w.strip_prefix('$') {
            Some(name) => {
                let name = name.trim_start_matches('{').trim_end_matches('}');
                vars.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            }
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares version-like strings: runs of digits numerically, the rest bytewise.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, ra) = a.split_at(na);
                let (db, rb) = b.split_at(nb);
                let da = trim_zeros(da);
                let db = trim_zeros(db);
                let o = da.len().cmp(&db.len()).then(da.cmp(db));
                if o != Ordering::Equal {
                    return o;
                }
                a = ra;
                b = rb;
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = a.get(1..).unwrap_or(&[]);
                b = b.get(1..).unwrap_or(&[]);
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    d.get(n..).unwrap_or(&[])
}

/// The entry to boot: `saved` (an id) when it names one that has a `linux` line, else the
/// first bootable entry in the spec's order.
pub fn choose(mut entries: Vec<BlsEntry>, saved: Option<&str>) -> Option<BlsEntry> {
    entries.retain(|e| e.linux.is_some());
    if let Some(s) = saved
        && let Some(i) = entries.iter().position(|e| e.id == s)
    {
        return Some(entries.swap_remove(i));
    }
    entries.sort_by(|a, b| match (&a.sort_key, &b.sort_key) {
        (Some(x), Some(y)) => x.cmp(y).then_with(|| newest_first(a, b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => newest_first(a, b),
    });
    entries.into_iter().next()
}

fn newest_first(a: &BlsEntry, b: &BlsEntry) -> Ordering {
    let va = a.version.as_deref().unwrap_or(&a.id);
    let vb = b.version.as_deref().unwrap_or(&b.id);
    version_cmp(vb, va).then_with(|| version_cmp(&b.id, &a.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As kernel-install writes them on Fedora 39 (separate /boot, XBOOTLDR layout).
    const FEDORA_NEW: &str = "title Fedora Linux (6.6.8-200.fc39.x86_64) 39 (Server Edition)
version 6.6.8-200.fc39.x86_64
linux /vmlinuz-6.6.8-200.fc39.x86_64
initrd /initramfs-6.6.8-200.fc39.x86_64.img
options root=UUID=bbbb ro rootflags=subvol=root rhgb quiet
grub_users $grub_users
grub_arg --unrestricted
grub_class fedora
";
    const FEDORA_OLD: &str = "title Fedora Linux (6.5.6-300.fc39.x86_64) 39 (Server Edition)
version 6.5.6-300.fc39.x86_64
linux /vmlinuz-6.5.6-300.fc39.x86_64
initrd /initramfs-6.5.6-300.fc39.x86_64.img
options $kernelopts
grub_class fedora
";
    const RESCUE: &str = "title Fedora Linux (0-rescue-abc) 39
version 0-rescue-abc
linux /vmlinuz-0-rescue-abc
initrd /initramfs-0-rescue-abc.img
options root=UUID=bbbb ro
";

    fn entries(vars: &[(String, String)]) -> Vec<BlsEntry> {
        vec![
            parse_entry("abc-0-rescue", RESCUE, vars),
            parse_entry("abc-6.5.6-300.fc39.x86_64", FEDORA_OLD, vars),
            parse_entry("abc-6.6.8-200.fc39.x86_64", FEDORA_NEW, vars),
        ]
    }

    #[test]
    fn fedora_newest_first() {
        let e = choose(entries(&[]), None).unwrap();
        assert_eq!(e.linux.as_deref(), Some("/vmlinuz-6.6.8-200.fc39.x86_64"));
        assert_eq!(e.initrds, ["/initramfs-6.6.8-200.fc39.x86_64.img"]);
        assert_eq!(
            e.options,
            "root=UUID=bbbb ro rootflags=subvol=root rhgb quiet"
        );
        assert!(e.display().starts_with("Fedora Linux (6.6.8"));
    }

    #[test]
    fn saved_entry_and_kernelopts() {
        let vars = vec![(
            "kernelopts".to_string(),
            "root=UUID=cccc ro quiet".to_string(),
        )];
        let e = choose(entries(&vars), Some("abc-6.5.6-300.fc39.x86_64")).unwrap();
        assert_eq!(e.options, "root=UUID=cccc ro quiet");
        // An unknown saved entry: the spec's order.
        let e = choose(entries(&vars), Some("gone")).unwrap();
        assert_eq!(e.version.as_deref(), Some("6.6.8-200.fc39.x86_64"));
    }

    #[test]
    fn sort_key_and_no_linux() {
        let a = parse_entry("a", "sort-key zzz\nversion 1\nlinux /a\n", &[]);
        let b = parse_entry("b", "version 9\nlinux /b\n", &[]);
        let efi = parse_entry("c", "sort-key aaa\nefi /EFI/x.efi\n", &[]);
        assert_eq!(choose(vec![b, a, efi.clone()], None).unwrap().id, "a");
        assert!(choose(vec![efi], None).is_none());
    }

    #[test]
    fn versions() {
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Ordering::Greater);
        assert_eq!(version_cmp("5.15.0-91", "5.15.0-101"), Ordering::Less);
        assert_eq!(version_cmp("1.010", "1.10"), Ordering::Equal);
    }
}
