//! `bench migrate`: live migration of a 512 MiB guest running memwork.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::boot::wait_outcome;
use crate::control::Qmp;
use crate::snapshot::wait_migration;
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line, run_command};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

const MEM_MIB: u64 = 512;
/// How long the destination has to print a `MEMWORK OK` after the hand-off.
const VERIFY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    pub wall_ms: f64,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes: u64,
    /// What the destination guest showed afterwards.
    pub verified: String,
}

/// The last line of `anyvisor migrate` output that is a JSON object with the three fields.
pub fn parse_final_json(stdout: &str) -> Option<(f64, f64, u64)> {
    stdout.lines().rev().find_map(|l| {
        let v: Value = serde_json::from_str(l.trim()).ok()?;
        Some((
            v.get("total_ms")?.as_f64()?,
            v.get("downtime_ms")?.as_f64()?,
            v.get("bytes")?.as_u64()?,
        ))
    })
}

/// total-time, downtime and ram.transferred of a completed `query-migrate`.
pub fn parse_query_migrate(v: &Value) -> Option<(f64, f64, u64)> {
    Some((
        v.get("total-time")?.as_f64()?,
        v.get("downtime")?.as_f64()?,
        v.get("ram")?.get("transferred")?.as_u64()?,
    ))
}

/// Waits for the source guest's first `MEMWORK OK`.
fn wait_memwork(setup: &Setup, p: &mut VmProc) -> Outcome<()> {
    let w = p.wait_line(0, "MEMWORK OK", setup.deadline());
    match wait_outcome(p, &w, setup.timeout_secs) {
        Outcome::Ok(_) => Outcome::Ok(()),
        Outcome::Failed(m) => Outcome::Failed(format!("source: {m}")),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    }
}

/// Checks the destination keeps running memwork: a new `MEMWORK OK`, no `CORRUPT`.
fn verify_destination(d: &mut VmProc, from: usize) -> String {
    let w = d.wait_any(
        from,
        &["MEMWORK", "Kernel panic", "BUG:", "Oops"],
        Instant::now() + VERIFY,
    );
    match w {
        crate::vmproc::Wait::Found(i) => {
            let text = d.lines[i].text.clone();
            if text.contains("MEMWORK OK") {
                "MEMWORK OK on destination".into()
            } else {
                let text = text.trim();
                // Drop the guest's printk time stamp.
                let text = text
                    .split_once("] ")
                    .filter(|_| text.starts_with('['))
                    .map_or(text, |(_, t)| t);
                format!("destination guest: {text}")
            }
        }
        crate::vmproc::Wait::Timeout => {
            format!("no MEMWORK line on destination in {} s", VERIFY.as_secs())
        }
        _ => format!("destination: {}", d.failure_reason()),
    }
}

fn anyvisor_case(
    setup: &Setup,
    backend: &str,
    dest_backend: &str,
    cmds: &mut Vec<(String, String)>,
) -> Outcome<Migration> {
    let pair = format!("{backend}-{dest_backend}");
    let api = setup.scratch(&format!("mig-{pair}.sock"));
    let dest_sock = setup.scratch(&format!("mig-{pair}.incoming"));
    let mut args = anyvisor_args(setup, backend, "bzImage", MEM_MIB, &cmdline("memwork"));
    args.extend(["--api-socket".into(), api.display().to_string()]);
    let dargs: Vec<String> = vec![
        "run".into(),
        "--incoming".into(),
        format!("unix:{}", dest_sock.display()),
        "--backend".into(),
        dest_backend.into(),
        "--serial".into(),
        "stdio".into(),
    ];
    let margs: Vec<String> = vec![
        "migrate".into(),
        "--api-socket".into(),
        api.display().to_string(),
        "--to".into(),
        format!("unix:{}", dest_sock.display()),
    ];
    cmds.push((
        format!("anyvisor {backend} -> {dest_backend}: source"),
        command_line(&setup.anyvisor, &args),
    ));
    cmds.push((
        format!("anyvisor {backend} -> {dest_backend}: destination"),
        command_line(&setup.anyvisor, &dargs),
    ));
    cmds.push((
        format!("anyvisor {backend} -> {dest_backend}: migrate"),
        command_line(&setup.anyvisor, &margs),
    ));
    let mut dst = match VmProc::spawn(&setup.anyvisor, &dargs, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start destination: {e}")),
    };
    // The destination first (it waits anyway): fails fast if it refuses --incoming.
    let listen_by = Instant::now() + Duration::from_secs(10);
    while !dest_sock.exists() && dst.exit.is_none() && Instant::now() < listen_by {
        dst.idle(Duration::from_millis(10));
    }
    if dst.exit.is_some() {
        return Outcome::Failed(format!("destination: {}", dst.failure_reason()));
    }
    let mut src = match VmProc::spawn(&setup.anyvisor, &args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    if let Some(f) = wait_memwork(setup, &mut src).failure() {
        return f;
    }
    let res = run_command(&setup.anyvisor, &margs, setup.timeout());
    let (wall, st, out, err) = match res {
        Err(e) => return Outcome::Failed(format!("cannot run migrate: {e}")),
        Ok((_, None, _, _)) => return Outcome::Timeout(setup.timeout_secs),
        Ok(r) => r,
    };
    let Some(st) = st else {
        return Outcome::Timeout(setup.timeout_secs);
    };
    if !st.success() {
        let why = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .map(|l| l.trim_start_matches("error:").trim().to_string())
            .unwrap_or_else(|| format!("migrate {st}"));
        return Outcome::Failed(why);
    }
    let Some((total_ms, downtime_ms, bytes)) = parse_final_json(&out) else {
        return Outcome::Failed("migrate printed no final JSON line".into());
    };
    let from = dst.lines.len();
    let verified = verify_destination(&mut dst, from);
    let _ = src.wait_exit(Instant::now() + Duration::from_secs(5));
    Outcome::Ok(Migration {
        wall_ms: wall.as_secs_f64() * 1000.0,
        total_ms,
        downtime_ms,
        bytes,
        verified,
    })
}

fn qemu_case(setup: &Setup, cmds: &mut Vec<(String, String)>) -> Outcome<Migration> {
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => return Outcome::Failed(format!("no free port: {e}")),
    };
    let sq = setup.scratch("qmig-src.qmp");
    let dq = setup.scratch("qmig-dst.qmp");
    let mut args = qemu_args(setup, "tcg", "bzImage", MEM_MIB, &cmdline("memwork"));
    let mut dargs = args.clone();
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", sq.display()),
    ]);
    dargs.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", dq.display()),
        "-incoming".into(),
        format!("tcp:127.0.0.1:{port}"),
    ]);
    cmds.push(("QEMU TCG: source".into(), command_line(&setup.qemu, &args)));
    cmds.push((
        "QEMU TCG: destination".into(),
        command_line(&setup.qemu, &dargs),
    ));
    cmds.push((
        "QEMU TCG: migrate (QMP)".into(),
        format!(
            "migrate-set-parameters max-bandwidth=1T; migrate uri=tcp:127.0.0.1:{port}; query-migrate until completed"
        ),
    ));
    let mut src = match VmProc::spawn(&setup.qemu, &args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    if let Some(f) = wait_memwork(setup, &mut src).failure() {
        return f;
    }
    let mut dst = match VmProc::spawn(&setup.qemu, &dargs, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start destination: {e}")),
    };
    let deadline = setup.deadline();
    let r = (|| -> Result<(Duration, Value), String> {
        // The destination listens once its QMP socket is up.
        Qmp::connect(&dq, deadline).map_err(|e| format!("destination: {e}"))?;
        let mut q = Qmp::connect(&sq, deadline).map_err(|e| e.to_string())?;
        q.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 1u64 << 40})),
        )
        .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        q.execute(
            "migrate",
            Some(json!({"uri": format!("tcp:127.0.0.1:{port}")})),
        )
        .map_err(|e| e.to_string())?;
        let v = wait_migration(&mut q, deadline)?;
        Ok((t0.elapsed(), v))
    })();
    let (wall, v) = match r {
        Ok(x) => x,
        Err(e) if e == "timeout" => return Outcome::Timeout(setup.timeout_secs),
        Err(e) => return Outcome::Failed(e),
    };
    let Some((total_ms, downtime_ms, bytes)) = parse_query_migrate(&v) else {
        return Outcome::Failed(format!("unexpected query-migrate reply: {v}"));
    };
    let from = dst.lines.len();
    let verified = verify_destination(&mut dst, from);
    Outcome::Ok(Migration {
        wall_ms: wall.as_secs_f64() * 1000.0,
        total_ms,
        downtime_ms,
        bytes,
        verified,
    })
}

pub fn run(setup: &Setup) {
    let mut cmds = Vec::new();
    let mut rows = Vec::new();
    // Every pair of the chosen backends, same-backend pairs first, then the cross-backend ones.
    let pairs = setup
        .backends
        .iter()
        .map(|b| (b, b))
        .chain(setup.backends.iter().flat_map(|a| {
            setup
                .backends
                .iter()
                .filter(move |b| *b != a)
                .map(move |b| (a, b))
        }));
    for (a, b) in pairs {
        eprintln!("[migrate] anyvisor {a} -> {b}");
        let r = anyvisor_case(setup, a, b, &mut cmds);
        eprintln!("[migrate]   {r:?}");
        rows.push((format!("anyvisor {a} -> {b} (unix socket)"), r, false));
    }
    if setup.qemu_enabled {
        eprintln!("[migrate] QEMU TCG");
        let r = qemu_case(setup, &mut cmds);
        eprintln!("[migrate]   {r:?}");
        rows.push(("QEMU 7.2 TCG -> TCG (tcp loopback)".into(), r, true));
    }
    crate::print_header(
        &format!("Live migration: {MEM_MIB} MiB guest running memwork"),
        setup,
    );
    let mut t = Table::new(&[
        "VMM",
        "wall (ms)",
        "total (ms)",
        "downtime (ms)",
        "sent (MiB)",
        "total vs QEMU",
        "downtime vs QEMU",
        "sent vs QEMU",
        "result",
    ]);
    let peer = rows.iter().find(|r| r.2).and_then(|r| r.1.ok().cloned());
    for (label, r, is_peer) in &rows {
        let m = r.ok();
        let f = |g: fn(&Migration) -> f64| m.map(g);
        let pf = |g: fn(&Migration) -> f64| if *is_peer { None } else { peer.as_ref().map(g) };
        t.row(vec![
            label.clone(),
            f(|m| m.wall_ms).map_or("-".into(), |v| format!("{v:.0}")),
            f(|m| m.total_ms).map_or("-".into(), |v| format!("{v:.0}")),
            f(|m| m.downtime_ms).map_or("-".into(), |v| format!("{v:.0}")),
            f(|m| m.bytes as f64).map_or("-".into(), |v| format!("{:.1}", v / 1048576.0)),
            table::ratio(f(|m| m.total_ms), pf(|m| m.total_ms)),
            table::ratio(f(|m| m.downtime_ms), pf(|m| m.downtime_ms)),
            table::ratio(f(|m| m.bytes as f64), pf(|m| m.bytes as f64)),
            match r {
                Outcome::Ok(m) => m.verified.clone(),
                other => other.problem().unwrap_or_default(),
            },
        ]);
    }
    print!("{t}");
    println!(
        "\nStarted once the source printed its first `MEMWORK OK`. anyvisor: total/downtime/bytes \
         from the final JSON line of `anyvisor migrate`; QEMU: total-time, downtime and \
         ram.transferred of `query-migrate` (bandwidth limit lifted, default downtime limit). \
         wall = from the migrate request to completion as seen by the harness. The result column \
         checks the destination prints a new `MEMWORK OK` (memwork verifies every page)."
    );
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_json_line() {
        let out = "sent 10 MiB\n{\"total_ms\":1200,\"downtime_ms\":35.5,\"bytes\":536870912}\n";
        assert_eq!(parse_final_json(out), Some((1200.0, 35.5, 536_870_912)));
        assert_eq!(parse_final_json("{\"total_ms\":1}\n"), None);
        assert_eq!(parse_final_json(""), None);
    }

    #[test]
    fn query_migrate_reply() {
        let v = json!({"status": "completed", "total-time": 900, "downtime": 12,
                       "ram": {"transferred": 1000}});
        assert_eq!(parse_query_migrate(&v), Some((900.0, 12.0, 1000)));
        assert_eq!(parse_query_migrate(&json!({"status": "completed"})), None);
    }
}
