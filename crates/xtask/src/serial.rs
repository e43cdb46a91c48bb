//! Serial console output: splitting a byte stream into lines and finding markers in them.

use std::time::Duration;

/// Longest line kept whole; longer runs without a newline are cut into pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// Turns chunks of console bytes into complete lines (`\n`-terminated; `\r` dropped).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds one chunk; returns the lines it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in chunk {
            match b {
                b'\n' => out.push(self.take()),
                b'\r' => {}
                _ => {
                    self.partial.push(b);
                    if self.partial.len() >= MAX_LINE {
                        out.push(self.take());
                    }
                }
            }
        }
        out
    }

    /// The unterminated rest at end of stream, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        line
    }
}

/// One console line and when it arrived, relative to the VMM's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// Index of the first line at or after `from` that contains `marker`.
pub fn find_marker(lines: &[Line], from: usize, marker: &str) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| l.text.contains(marker))
        .map(|(i, _)| i)
}

/// Parses `KEY=VALUE` tokens that follow `prefix` in a line such as
/// `BLKBENCH seqread=12.5 seqwrite=3.0 randread_iops=900`.
pub fn parse_kv_line(text: &str, prefix: &str) -> Option<Vec<(String, String)>> {
    let start = text.find(prefix)?;
    let rest = &text[start + prefix.len()..];
    Some(
        rest.split_whitespace()
            .filter_map(|tok| tok.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ms: u64, text: &str) -> Line {
        Line {
            at: Duration::from_millis(ms),
            text: text.to_string(),
        }
    }

    #[test]
    fn marker_split_across_chunks_is_one_line() {
        let mut s = LineSplitter::default();
        assert!(s.feed(b"[ 1.0] boot\r\nANYVISOR-IN").len() == 1);
        let lines = s.feed(b"IT-OK\r\nrest");
        assert_eq!(lines, vec!["ANYVISOR-INIT-OK".to_string()]);
        assert_eq!(s.finish().as_deref(), Some("rest"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn overlong_line_is_cut() {
        let mut s = LineSplitter::default();
        let lines = s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(s.finish().map(|l| l.len()), Some(10));
    }

    #[test]
    fn invalid_utf8_does_not_lose_the_marker() {
        let mut s = LineSplitter::default();
        let lines = s.feed(b"\xff\xfeANYVISOR-INIT-OK\n");
        assert_eq!(
            find_marker(&[line(0, &lines[0])], 0, "ANYVISOR-INIT-OK"),
            Some(0)
        );
    }

    #[test]
    fn find_marker_respects_start_and_absence() {
        let lines = [
            line(1, "MEMWORK OK 1 1"),
            line(2, "noise"),
            line(3, "MEMWORK OK 2 2"),
        ];
        assert_eq!(find_marker(&lines, 0, "MEMWORK OK"), Some(0));
        assert_eq!(find_marker(&lines, 1, "MEMWORK OK"), Some(2));
        assert_eq!(find_marker(&lines, 3, "MEMWORK OK"), None);
        assert_eq!(find_marker(&lines, 0, "ANYVISOR-INIT-OK"), None);
    }

    #[test]
    fn kv_line() {
        let kv = parse_kv_line(
            "[  5.1] BLKBENCH seqread=12.5 seqwrite=3 randread_iops=900",
            "BLKBENCH",
        );
        let kv = kv.unwrap_or_default();
        assert_eq!(kv.len(), 3);
        assert_eq!(kv[0], ("seqread".to_string(), "12.5".to_string()));
        assert_eq!(kv[2].1, "900");
        assert!(parse_kv_line("nothing here", "BLKBENCH").is_none());
    }
}
