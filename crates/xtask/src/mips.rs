//! `bench emu-mips`: the emu backend's guest instruction rate.
//!
//! anyvisor does not print `hv_emu::instructions_retired()`, so the count comes from hv-emu's
//! `boot` example (same kernel, initrd and marker), which prints it. anyvisor's and QEMU's rates
//! are then estimated as that instruction count over their own time to `ANYVISOR-INIT-OK`.

use std::path::PathBuf;
use std::time::Duration;

use crate::boot::wait_outcome;
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line, run_command};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

/// Parses the example's last report line:
/// `[boot] reached the marker after 151.0s, 1630000000 instructions, 10.8 MIPS, 0 user-mode
/// runs`, with an optional note in parentheses after the count (`1630000000 instructions
/// (1610000000 translated), ...`). The fields after the rate (`, 0 user-mode runs` today) are
/// ignored, so the example may report more without breaking the bench.
pub fn parse_example_report(stderr: &str) -> Option<(f64, u64, f64)> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("reached the marker after"))?;
    let rest = line.split("after ").nth(1)?;
    let (secs, rest) = rest.split_once("s, ")?;
    let (n, rest) = rest.split_once(" instructions")?;
    // An optional note in parentheses follows the count (`(N translated)` today).
    let rest = match rest.strip_prefix(" (") {
        Some(r) => r.split_once(')')?.1,
        None => rest,
    };
    let (mips, _) = rest.strip_prefix(", ")?.split_once(" MIPS")?;
    Some((
        secs.parse().ok()?,
        n.parse().ok()?,
        mips.trim().parse().ok()?,
    ))
}

/// A `N MIPS` figure anywhere in text (for a VMM that prints its rate).
pub fn find_mips(text: &str) -> Option<f64> {
    text.lines().rev().find_map(|l| {
        let toks: Vec<&str> = l.split_whitespace().collect();
        toks.windows(2).find_map(|w| {
            (w[1].trim_end_matches([',', '.', ')']) == "MIPS")
                .then(|| w[0].parse().ok())
                .flatten()
        })
    })
}

fn time_to_init(
    setup: &Setup,
    program: &std::path::Path,
    args: &[String],
) -> (Outcome<Duration>, String) {
    let mut p = match VmProc::spawn(program, args, 0) {
        Ok(p) => p,
        Err(e) => return (Outcome::Failed(format!("cannot start: {e}")), String::new()),
    };
    let w = p.wait_line(0, "ANYVISOR-INIT-OK", setup.deadline());
    let out = match wait_outcome(&p, &w, setup.timeout_secs) {
        Outcome::Ok(i) => Outcome::Ok(p.lines[i].at),
        Outcome::Failed(m) => Outcome::Failed(m),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    };
    p.kill();
    (out, p.stderr_text())
}

fn example_binary(setup: &Setup) -> Result<PathBuf, String> {
    if let Some(p) = &setup.emu_example {
        return Ok(p.clone());
    }
    crate::cargo_build("hv-emu", &["--example", "boot"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    Ok(target.join("release/examples/boot"))
}

pub fn run(setup: &Setup) {
    let append = cmdline("poweroff");
    let mut cmds = Vec::new();
    // 1. The counted boot.
    let counted: Outcome<(f64, u64, f64)> = match example_binary(setup) {
        Err(e) => Outcome::Failed(e),
        Ok(bin) => {
            let args: Vec<String> = vec![
                "--kernel".into(),
                setup.kernel("vmlinux").display().to_string(),
                "--initrd".into(),
                setup.initrd().display().to_string(),
                "--timeout".into(),
                setup.timeout_secs.to_string(),
                "--".into(),
                "quiet".into(),
                "anyvisor.test=poweroff".into(),
            ];
            cmds.push(("hv-emu boot example".to_string(), command_line(&bin, &args)));
            eprintln!("[emu-mips] hv-emu boot example");
            match run_command(&bin, &args, setup.timeout() + Duration::from_secs(10)) {
                Err(e) => Outcome::Failed(format!("cannot start: {e}")),
                Ok((_, None, _, _)) => Outcome::Timeout(setup.timeout_secs),
                Ok((_, Some(_), _, err)) => match parse_example_report(&err) {
                    Some(r) => Outcome::Ok(r),
                    None => Outcome::Failed(
                        err.lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("no report")
                            .trim()
                            .to_string(),
                    ),
                },
            }
        }
    };
    let count = counted.ok().map(|r| r.1);
    // 2. anyvisor emu and 3. QEMU TCG, timed to the same marker.
    let mut rows = Vec::new();
    for b in &setup.backends {
        let args = anyvisor_args(setup, b, "vmlinux", 256, &append);
        cmds.push((
            format!("anyvisor {b}"),
            command_line(&setup.anyvisor, &args),
        ));
        eprintln!("[emu-mips] anyvisor --backend {b}");
        let (t, err) = time_to_init(setup, &setup.anyvisor, &args);
        rows.push((format!("anyvisor --backend {b}"), t, find_mips(&err)));
    }
    if setup.qemu_enabled {
        let args = qemu_args(setup, "tcg", "vmlinux", 256, &append);
        cmds.push(("QEMU TCG".into(), command_line(&setup.qemu, &args)));
        eprintln!("[emu-mips] QEMU TCG");
        let (t, _) = time_to_init(setup, &setup.qemu, &args);
        rows.push(("QEMU 7.2 TCG (microvm)".into(), t, None));
    }
    crate::print_header("emu MIPS: guest instruction rate", setup);
    let mut t = Table::new(&[
        "runner",
        "to INIT-OK (s)",
        "instructions",
        "MIPS",
        "basis",
        "vs QEMU TCG (time)",
        "result",
    ]);
    match &counted {
        Outcome::Ok((secs, n, mips)) => t.row(vec![
            "hv-emu boot example (emu CPU, own minimal platform)".into(),
            format!("{secs:.2}"),
            n.to_string(),
            format!("{mips:.1}"),
            "counted (hv_emu::instructions_retired)".into(),
            String::new(),
            "ok".into(),
        ]),
        other => t.row(vec![
            "hv-emu boot example".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "counted".into(),
            String::new(),
            other.problem().unwrap_or_default(),
        ]),
    }
    let qemu_secs = rows
        .iter()
        .find(|r| r.0.starts_with("QEMU"))
        .and_then(|r| r.1.ok().map(Duration::as_secs_f64));
    for (label, out, printed) in &rows {
        let secs = out.ok().map(Duration::as_secs_f64);
        let (mips, basis) = match (printed, secs, count) {
            (Some(m), _, _) => (format!("{m:.1}"), "printed by the VMM".to_string()),
            (None, Some(s), Some(n)) if s > 0.0 => (
                format!("~{:.1}", n as f64 / s / 1e6),
                "estimate: counted instructions / time".to_string(),
            ),
            _ => ("-".into(), "no count available".into()),
        };
        let vs = if label.starts_with("QEMU") {
            String::new()
        } else {
            table::ratio(secs, qemu_secs)
        };
        t.row(vec![
            label.clone(),
            secs.map_or("-".into(), |s| format!("{s:.2}")),
            count.map_or("-".into(), |n| n.to_string()),
            mips,
            basis,
            vs,
            out.problem().unwrap_or_else(|| "ok".into()),
        ]);
    }
    print!("{t}");
    println!(
        "\nThe instruction count is the emu CPU's own count for one boot of vmlinux to \
         ANYVISOR-INIT-OK on hv-emu's example platform; the anyvisor and QEMU rates assume the \
         same count on their platforms (an estimate: timer and device paths differ)."
    );
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_report() {
        let err = "noise\n\n[boot] 10.0s 9.0 MIPS, 5 decoded\n\
                   [boot] reached the marker after 151.0s, 1630000000 instructions, 10.8 MIPS\n";
        assert_eq!(
            parse_example_report(err),
            Some((151.0, 1_630_000_000, 10.8))
        );
        // Today's line: the user-mode run count follows the rate.
        let err = "[boot] reached the marker after 12.3s, 1580000000 instructions, 128.4 MIPS, \
                   0 user-mode runs\n";
        assert_eq!(
            parse_example_report(err),
            Some((12.3, 1_580_000_000, 128.4))
        );
        // With the translated count after the total, as the example prints since the
        // translator became the default.
        let err = "[boot] reached the marker after 5.3s, 1816186919 instructions (1797159584 \
                   translated), 342.2 MIPS, 0 user-mode runs\n";
        assert_eq!(parse_example_report(err), Some((5.3, 1_816_186_919, 342.2)));
        assert_eq!(
            parse_example_report("[boot] reached the marker after 1.0s, 5 instructions, x MIPS"),
            None
        );
        assert_eq!(
            parse_example_report("[boot] reached the marker after 1.0s, 5 instructions (4, 1 MIPS"),
            None
        );
        assert_eq!(
            parse_example_report("[boot] stopped after 3.0s, 10 instructions, 0.0 MIPS"),
            None
        );
    }

    #[test]
    fn mips_anywhere() {
        assert_eq!(find_mips("vcpu0: 12.5 MIPS, 3 G retired"), Some(12.5));
        assert_eq!(find_mips("no rate here"), None);
        assert_eq!(find_mips("x MIPS"), None);
    }
}
