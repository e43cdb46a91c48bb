//! `ANYVISOR_LOG=error|warn|info|debug|trace`: prints the VMM's `tracing` events at that level
//! and above on stderr, one `anyvisor: LEVEL: message field=value ...` line each. Unset or
//! `off`: nothing is printed (the default). Lines a guest or peer can trigger are rate-limited
//! at their call sites (`hv::rate_limited!`), so a hostile guest cannot flood this output.
//!
//! Events with the target [`hv::NOTICE`] are lines for the user (the backend picked, "waiting
//! for a migration", a key-file warning): they are printed always, as written, without a level.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber, span};

pub const ENV: &str = "ANYVISOR_LOG";

/// The level `value` asks for: `Ok(None)` for `off`.
fn parse_level(value: &str) -> Result<Option<Level>, String> {
    Ok(Some(match value {
        "off" | "" => return Ok(None),
        "error" => Level::ERROR,
        "warn" => Level::WARN,
        "info" => Level::INFO,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        other => {
            return Err(format!(
                "{ENV}={other:?} is not one of off, error, warn, info, debug, trace"
            ));
        }
    }))
}

/// Installs the stderr printer: notices always, other events at the level [`ENV`] asks for. A
/// value it does not know is reported on stderr and logging stays off: the variable is a
/// diagnostic aid, not worth refusing to run.
pub fn install_from_env() {
    let max = match std::env::var_os(ENV).map(|v| parse_level(&v.to_string_lossy())) {
        None => None,
        Some(Ok(max)) => max,
        Some(Err(e)) => {
            eprintln!("anyvisor: {e}; logging stays off");
            None
        }
    };
    let printer = Printer {
        max,
        out: Box::new(|line| eprintln!("{line}")),
    };
    let _ = tracing::subscriber::set_global_default(printer);
}

/// A `tracing` subscriber that turns each enabled event into one line (no spans: the VMM has
/// none).
struct Printer {
    /// Events other than notices at this level and above; `None`: none of them.
    max: Option<Level>,
    out: Box<dyn Fn(&str) + Send + Sync>,
}

impl Subscriber for Printer {
    /// Also decides each call site's cached interest (the default `register_callsite`), so
    /// disabled diagnostics cost one check per call site, not one per event.
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == hv::NOTICE || self.max.is_some_and(|max| *metadata.level() <= max)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Notices are INFO or above (hv::NOTICE).
        Some(LevelFilter::from_level(
            self.max.map_or(Level::INFO, |max| max.max(Level::INFO)),
        ))
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        (self.out)(&format_event(event));
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

fn format_event(event: &Event<'_>) -> String {
    let mut line = Line::default();
    event.record(&mut line);
    if event.metadata().target() == hv::NOTICE {
        return format!("{}{}", line.message, line.fields);
    }
    let level = match *event.metadata().level() {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    };
    format!("anyvisor: {level}: {}{}", line.message, line.fields)
}

#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn capture(max: impl Into<Option<Level>>, body: impl FnOnce()) -> Vec<String> {
        let max = max.into();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let printer = Printer {
            max,
            out: Box::new(move |l| sink.lock().unwrap().push(l.to_string())),
        };
        tracing::subscriber::with_default(printer, body);
        lines.lock().unwrap().clone()
    }

    #[test]
    fn levels_parse_and_unknown_values_are_errors() {
        assert_eq!(parse_level("off"), Ok(None));
        assert_eq!(parse_level("warn"), Ok(Some(Level::WARN)));
        assert_eq!(parse_level("trace"), Ok(Some(Level::TRACE)));
        assert!(parse_level("WARN").unwrap_err().contains("ANYVISOR_LOG"));
        assert!(parse_level("verbose").is_err());
    }

    #[test]
    fn one_line_per_event_at_the_level_and_above() {
        let lines = capture(Level::WARN, || {
            tracing::error!("disk gone: {}", "ENOENT");
            tracing::warn!(device = 2, offset = 0x70, "virtio device needs reset");
            tracing::info!("not shown");
            tracing::debug!("not shown");
        });
        assert_eq!(
            lines,
            [
                "anyvisor: error: disk gone: ENOENT",
                "anyvisor: warning: virtio device needs reset device=2 offset=112",
            ]
        );
    }

    #[test]
    fn notices_print_as_written_whatever_the_level() {
        let body = || {
            tracing::info!(target: hv::NOTICE, "anyvisor: using backend emu (no /dev/kvm)");
            tracing::warn!(target: hv::NOTICE, "warning: key file is readable by others");
            tracing::warn!("not a notice");
        };
        assert_eq!(
            capture(None, body),
            [
                "anyvisor: using backend emu (no /dev/kvm)",
                "warning: key file is readable by others",
            ]
        );
        assert_eq!(
            capture(Level::TRACE, body),
            [
                "anyvisor: using backend emu (no /dev/kvm)",
                "warning: key file is readable by others",
                "anyvisor: warning: not a notice",
            ]
        );
    }

    #[test]
    fn a_guest_flood_prints_a_bounded_number_of_lines() {
        let lines = capture(Level::TRACE, || {
            for i in 0..10_000 {
                hv::rate_limited!(tracing::debug!(offset = i, "virtio-mmio: unaligned read"));
            }
        });
        assert_eq!(lines.len(), hv::ratelimit::BURST as usize, "{lines:?}");
        assert_eq!(
            lines[0],
            "anyvisor: debug: virtio-mmio: unaligned read offset=0"
        );
    }
}
