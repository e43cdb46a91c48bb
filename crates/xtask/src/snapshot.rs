//! `bench snapshot`: snapshot time, file size and restore-to-running time.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::boot::wait_outcome;
use crate::control::{self, Qmp};
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line, run_command};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

/// Guest sizes measured (MiB).
const SIZES: [u64; 2] = [256, 2048];
/// Time the guest sits idle at its shell after INIT-OK before the snapshot.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
struct Row {
    snapshot: Option<Outcome<Duration>>,
    apparent: Option<u64>,
    allocated: Option<u64>,
    restore: Option<Outcome<Duration>>,
    /// anyvisor's own report (`GET /vm` `restore_ms`): file opened to vCPUs started.
    restore_in_vmm_ms: Option<f64>,
}

/// (apparent bytes, allocated bytes) of a file.
pub fn file_sizes(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.blocks() * 512))
}

fn boot_idle(setup: &Setup, p: &mut VmProc) -> Outcome<()> {
    let w = p.wait_line(0, "ANYVISOR-INIT-OK", setup.deadline());
    match wait_outcome(p, &w, setup.timeout_secs) {
        Outcome::Ok(_) => {
            p.idle(SETTLE);
            Outcome::Ok(())
        }
        Outcome::Failed(m) => Outcome::Failed(format!("boot: {m}")),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    }
}

/// The `error:` line of a control command's stderr, or its status.
fn command_error(stderr: &str, status: Option<std::process::ExitStatus>) -> String {
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
        .unwrap_or_else(|| match status {
            Some(st) => format!("{st}"),
            None => "timeout".into(),
        })
}

fn anyvisor_case(setup: &Setup, backend: &str, mem: u64, cmds: &mut Vec<(String, String)>) -> Row {
    let mut row = Row::default();
    let api = setup.scratch(&format!("snap-{backend}-{mem}.sock"));
    let file = setup.scratch(&format!("snap-{backend}-{mem}.anyvisor"));
    let mut args = anyvisor_args(setup, backend, "bzImage", mem, &cmdline(""));
    args.extend(["--api-socket".into(), api.display().to_string()]);
    cmds.push((
        format!("anyvisor {backend} {mem} MiB: run"),
        command_line(&setup.anyvisor, &args),
    ));
    let snap_args: Vec<String> = vec![
        "snapshot".into(),
        "--api-socket".into(),
        api.display().to_string(),
        "--output".into(),
        file.display().to_string(),
        "--stop".into(),
        // A file of an earlier run may be there: replacing it is intended.
        "--force".into(),
    ];
    cmds.push((
        format!("anyvisor {backend} {mem} MiB: snapshot"),
        command_line(&setup.anyvisor, &snap_args),
    ));
    let mut p = match VmProc::spawn(&setup.anyvisor, &args, mem << 20) {
        Ok(p) => p,
        Err(e) => {
            row.snapshot = Some(Outcome::Failed(format!("cannot start: {e}")));
            return row;
        }
    };
    if let Some(f) = boot_idle(setup, &mut p).failure() {
        row.snapshot = Some(f);
        return row;
    }
    row.snapshot = Some(
        match run_command(&setup.anyvisor, &snap_args, setup.timeout()) {
            Err(e) => Outcome::Failed(format!("cannot run snapshot: {e}")),
            Ok((_, None, _, _)) => Outcome::Timeout(setup.timeout_secs),
            Ok((t, Some(st), _, _)) if st.success() => Outcome::Ok(t),
            Ok((_, st, _, err)) => Outcome::Failed(command_error(&err, st)),
        },
    );
    if row.snapshot.as_ref().and_then(Outcome::ok).is_none() {
        return row;
    }
    let _ = p.wait_exit(Instant::now() + Duration::from_secs(30));
    p.kill();
    if let Some((a, b)) = file_sizes(&file) {
        row.apparent = Some(a);
        row.allocated = Some(b);
    }
    // Restore.
    let api2 = setup.scratch(&format!("restore-{backend}-{mem}.sock"));
    let rargs: Vec<String> = vec![
        "run".into(),
        "--restore".into(),
        file.display().to_string(),
        "--backend".into(),
        backend.into(),
        "--serial".into(),
        "stdio".into(),
        "--api-socket".into(),
        api2.display().to_string(),
    ];
    cmds.push((
        format!("anyvisor {backend} {mem} MiB: restore"),
        command_line(&setup.anyvisor, &rargs),
    ));
    let mut r = match VmProc::spawn(&setup.anyvisor, &rargs, mem << 20) {
        Ok(r) => r,
        Err(e) => {
            row.restore = Some(Outcome::Failed(format!("cannot start: {e}")));
            return row;
        }
    };
    let deadline = setup.deadline();
    row.restore = Some(loop {
        if control::wait_anyvisor_running(&api2, Instant::now() + Duration::from_millis(50)).is_ok()
        {
            let took = r.start.elapsed();
            row.restore_in_vmm_ms =
                control::http(&api2, "GET", "/vm", Instant::now() + Duration::from_secs(5))
                    .ok()
                    .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                    .and_then(|v| v.get("restore_ms").and_then(serde_json::Value::as_f64));
            break Outcome::Ok(took);
        }
        r.idle(Duration::from_millis(1));
        if r.exit.is_some() {
            break Outcome::Failed(r.failure_reason());
        }
        if Instant::now() >= deadline {
            break Outcome::Timeout(setup.timeout_secs);
        }
    });
    r.kill();
    let _ = std::fs::remove_file(&file);
    row
}

fn qemu_case(setup: &Setup, mem: u64, cmds: &mut Vec<(String, String)>) -> Row {
    let mut row = Row::default();
    let qmp_path = setup.scratch(&format!("qsnap-{mem}.qmp"));
    let file = setup.scratch(&format!("qsnap-{mem}.qemu"));
    let mut args = qemu_args(setup, "tcg", "bzImage", mem, &cmdline(""));
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_path.display()),
    ]);
    cmds.push((
        format!("QEMU TCG {mem} MiB: run"),
        command_line(&setup.qemu, &args),
    ));
    let uri = format!("exec:cat > {}", file.display());
    cmds.push((
        format!("QEMU TCG {mem} MiB: snapshot (QMP)"),
        format!(
            "migrate-set-parameters max-bandwidth=1T; stop; migrate uri='{uri}'; query-migrate until completed"
        ),
    ));
    let mut p = match VmProc::spawn(&setup.qemu, &args, mem << 20) {
        Ok(p) => p,
        Err(e) => {
            row.snapshot = Some(Outcome::Failed(format!("cannot start: {e}")));
            return row;
        }
    };
    if let Some(f) = boot_idle(setup, &mut p).failure() {
        row.snapshot = Some(f);
        return row;
    }
    let deadline = setup.deadline();
    let snap = (|| -> Result<Duration, String> {
        let mut q = Qmp::connect(&qmp_path, deadline).map_err(|e| e.to_string())?;
        q.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 1u64 << 40})),
        )
        .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        q.execute("stop", None).map_err(|e| e.to_string())?;
        q.execute("migrate", Some(json!({ "uri": uri })))
            .map_err(|e| e.to_string())?;
        wait_migration(&mut q, deadline)?;
        Ok(t0.elapsed())
    })();
    row.snapshot = Some(match snap {
        Ok(t) => Outcome::Ok(t),
        Err(e) if e == "timeout" => Outcome::Timeout(setup.timeout_secs),
        Err(e) => Outcome::Failed(e),
    });
    p.kill();
    if row.snapshot.as_ref().and_then(Outcome::ok).is_none() {
        return row;
    }
    wait_file_stable(&file, Instant::now() + Duration::from_secs(30));
    if let Some((a, b)) = file_sizes(&file) {
        row.apparent = Some(a);
        row.allocated = Some(b);
    }
    // Restore.
    let qmp2 = setup.scratch(&format!("qrestore-{mem}.qmp"));
    let mut rargs = qemu_args(setup, "tcg", "bzImage", mem, &cmdline(""));
    rargs.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp2.display()),
        "-incoming".into(),
        format!("exec:cat {}", file.display()),
    ]);
    cmds.push((
        format!("QEMU TCG {mem} MiB: restore (then QMP cont, query-status until running)"),
        command_line(&setup.qemu, &rargs),
    ));
    let mut r = match VmProc::spawn(&setup.qemu, &rargs, mem << 20) {
        Ok(r) => r,
        Err(e) => {
            row.restore = Some(Outcome::Failed(format!("cannot start: {e}")));
            return row;
        }
    };
    let deadline = setup.deadline();
    row.restore = Some(
        match Qmp::connect(&qmp2, deadline)
            .and_then(|mut q| control::wait_qemu_running(&mut q, deadline))
        {
            Ok(()) => Outcome::Ok(r.start.elapsed()),
            Err(e) if Instant::now() >= deadline => {
                let _ = e;
                Outcome::Timeout(setup.timeout_secs)
            }
            Err(e) => {
                r.idle(Duration::from_millis(100));
                Outcome::Failed(format!("{e}; {}", r.failure_reason()))
            }
        },
    );
    r.kill();
    let _ = std::fs::remove_file(&file);
    row
}

/// Polls `query-migrate` until `completed`; an error for `failed`/`cancelled`, `"timeout"`.
pub fn wait_migration(q: &mut Qmp, deadline: Instant) -> Result<serde_json::Value, String> {
    loop {
        let r = q
            .execute("query-migrate", None)
            .map_err(|e| e.to_string())?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(r),
            Some(s @ ("failed" | "cancelled")) => {
                let why = r.get("error-desc").and_then(|d| d.as_str()).unwrap_or("");
                return Err(format!("migration {s} {why}").trim().to_string());
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err("timeout".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the file's size stops changing for 200 ms (a `cat` still draining a pipe).
fn wait_file_stable(path: &Path, deadline: Instant) {
    let mut last = None;
    let mut since = Instant::now();
    while Instant::now() < deadline {
        let now = file_sizes(path).map(|s| s.0);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cell(o: &Option<Outcome<Duration>>) -> String {
    match o {
        None => "-".into(),
        Some(Outcome::Ok(d)) => table::secs(*d),
        Some(other) => other.problem().unwrap_or_default(),
    }
}

fn secs(o: &Option<Outcome<Duration>>) -> Option<f64> {
    o.as_ref().and_then(Outcome::ok).map(Duration::as_secs_f64)
}

fn size_mib(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

pub fn run(setup: &Setup) {
    let mut cmds = Vec::new();
    let mut rows: Vec<(String, u64, Row, bool)> = Vec::new();
    for mem in SIZES {
        for b in &setup.backends {
            eprintln!("[snapshot] anyvisor {b} {mem} MiB");
            let r = anyvisor_case(setup, b, mem, &mut cmds);
            eprintln!("[snapshot]   {r:?}");
            rows.push((format!("anyvisor {b}"), mem, r, false));
        }
        if setup.qemu_enabled {
            eprintln!("[snapshot] QEMU TCG {mem} MiB");
            let r = qemu_case(setup, mem, &mut cmds);
            eprintln!("[snapshot]   {r:?}");
            rows.push(("QEMU 7.2 TCG".into(), mem, r, true));
        }
    }
    crate::print_header("Snapshot and restore", setup);
    let mut t = Table::new(&[
        "VMM",
        "guest MiB",
        "snapshot (s)",
        "file apparent (MiB)",
        "file allocated (MiB)",
        "restore to running (s)",
        "restore inside VMM (ms)",
        "snapshot vs QEMU",
        "allocated vs QEMU",
        "restore vs QEMU",
    ]);
    for (label, mem, r, peer) in &rows {
        let p = (!peer)
            .then(|| rows.iter().find(|x| x.3 && x.1 == *mem).map(|x| &x.2))
            .flatten();
        t.row(vec![
            label.clone(),
            mem.to_string(),
            cell(&r.snapshot),
            size_mib(r.apparent),
            size_mib(r.allocated),
            cell(&r.restore),
            r.restore_in_vmm_ms
                .map_or(String::new(), |ms| format!("{ms:.1}")),
            p.map_or(String::new(), |p| {
                table::ratio(secs(&r.snapshot), secs(&p.snapshot))
            }),
            p.map_or(String::new(), |p| {
                table::ratio(r.allocated.map(|v| v as f64), p.allocated.map(|v| v as f64))
            }),
            p.map_or(String::new(), |p| {
                table::ratio(secs(&r.restore), secs(&p.restore))
            }),
        ]);
    }
    print!("{t}");
    println!(
        "\nGuest: booted to its idle shell (no anyvisor.test), snapshot {} s after INIT-OK. \
         anyvisor: wall time of `anyvisor snapshot --stop` (pause, write, fsync, rename); restore \
         = spawn of `run --restore` to `GET /vm` state running; inside VMM = anyvisor's own \
         `restore_ms` (snapshot file opened to vCPU threads started, no process start-up). QEMU: QMP `stop` + `migrate \
         exec:cat > FILE` until `query-migrate` completed (no fsync; bandwidth limit lifted); \
         restore = spawn of `-incoming exec:cat FILE` to `query-status` running (after `cont`, \
         since the stream records a stopped guest).",
        SETTLE.as_secs()
    );
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_of_a_sparse_file() {
        let dir = std::env::temp_dir().join(format!("xtask-snap-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join("sparse");
        let Ok(file) = std::fs::File::create(&f) else {
            panic!("cannot create a temp file");
        };
        let _ = file.set_len(64 << 20);
        let (apparent, allocated) = file_sizes(&f).unwrap_or((0, u64::MAX));
        assert_eq!(apparent, 64 << 20);
        assert!(allocated < apparent, "allocated {allocated}");
        assert_eq!(file_sizes(&dir.join("missing")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn control_command_errors() {
        assert_eq!(
            command_error("error: snapshot is not supported yet\n", None),
            "snapshot is not supported yet"
        );
        assert_eq!(command_error("", None), "timeout");
    }
}
