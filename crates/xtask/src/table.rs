//! Markdown tables and number formatting.

use std::fmt;
use std::time::Duration;

/// What one measurement gave: a value, a failure with its reason, or no result in time.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    Ok(T),
    Failed(String),
    Timeout(u64),
}

impl<T> Outcome<T> {
    pub fn ok(&self) -> Option<&T> {
        match self {
            Outcome::Ok(v) => Some(v),
            _ => None,
        }
    }

    /// The same failure or timeout for another value type; `None` when there is a value.
    pub fn failure<U>(&self) -> Option<Outcome<U>> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::Failed(why) => Some(Outcome::Failed(why.clone())),
            Outcome::Timeout(s) => Some(Outcome::Timeout(*s)),
        }
    }

    /// The cell text for a failure or timeout, `None` when there is a value.
    pub fn problem(&self) -> Option<String> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::Failed(why) => Some(format!("fails: {why}")),
            Outcome::Timeout(s) => Some(format!("timeout ({s} s)")),
        }
    }
}

/// A Markdown table; cells are escaped and columns padded.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }
}

fn escape(cell: &str) -> String {
    cell.replace('|', "\\|").replace('\n', " ")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<Vec<String>> = std::iter::once(&self.header)
            .chain(self.rows.iter())
            .map(|r| r.iter().map(|c| escape(c)).collect())
            .collect();
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                all.iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(3)
            })
            .collect();
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            write!(f, "|")?;
            for (c, w) in cells.iter().zip(&widths) {
                write!(f, " {c:<w$} |")?;
            }
            writeln!(f)
        };
        if let Some(h) = all.first() {
            line(f, h)?;
        }
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(f, &dashes)?;
        for r in all.iter().skip(1) {
            line(f, r)?;
        }
        Ok(())
    }
}

/// Seconds with 2 decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// KiB as MiB with 1 decimal.
pub fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// `ours / peer` as `1.23x`; `-` when either is missing or the peer is zero.
pub fn ratio(ours: Option<f64>, peer: Option<f64>) -> String {
    match (ours, peer) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    }
}

/// Median of the values (the lower middle for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => None,
        n => Some(v[(n - 1) / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_padded_escaped_markdown() {
        let mut t = Table::new(&["VMM", "time (s)"]);
        t.row(vec!["anyvisor".into(), "1.50".into()]);
        t.row(vec!["a|b".into()]);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "| VMM      | time (s) |");
        assert_eq!(lines[1], "| -------- | -------- |");
        assert_eq!(lines[2], "| anyvisor | 1.50     |");
        assert_eq!(lines[3], "| a\\|b     |          |");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn ratio_and_median() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "-");
        assert_eq!(ratio(None, Some(2.0)), "-");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(1.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn outcome_cells() {
        assert_eq!(
            Outcome::<u32>::Timeout(30).problem().as_deref(),
            Some("timeout (30 s)")
        );
        assert_eq!(
            Outcome::<u32>::Failed("KVM internal error".into())
                .problem()
                .as_deref(),
            Some("fails: KVM internal error")
        );
        assert_eq!(Outcome::Ok(1).problem(), None);
        assert_eq!(secs(Duration::from_millis(1234)), "1.23");
        assert_eq!(mib(1536), "1.5");
    }
}
