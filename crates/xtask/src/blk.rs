//! `bench blk`: in-guest virtio-blk throughput with `/bin/blkbench` (guest/src/blkbench.c).
//!
//! Besides the guest's figures, each run records the host wall time and the VMM process's CPU
//! time (user + system of every thread, `/proc/PID/stat`) from `ANYVISOR-INIT-OK` to the
//! `BLKBENCH` line: the benchmark itself, without the boot. On a host whose cores are shared,
//! CPU time is the figure that does not depend on what else runs.

use std::io::Write;
use std::path::Path;

use crate::boot::wait_outcome;
use crate::serial::parse_kv_line;
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

const DISK_MIB: u64 = 256;
const MEM_MIB: u64 = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct BlkResult {
    pub seqread: f64,
    pub seqwrite: f64,
    pub randread_iops: f64,
    /// Host seconds from `ANYVISOR-INIT-OK` to the `BLKBENCH` line (0 when not measured).
    pub wall: f64,
    /// VMM process CPU seconds over the same stretch (0 when not measured).
    pub cpu: f64,
}

/// Parses `BLKBENCH seqread=<MB/s> seqwrite=<MB/s> randread_iops=<n>` or
/// `BLKBENCH error=<reason>`.
pub fn parse_blkbench(line: &str) -> Result<BlkResult, String> {
    let kv = parse_kv_line(line, "BLKBENCH").ok_or("no BLKBENCH line")?;
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    if let Some(e) = get("error") {
        return Err(format!("guest: {e}"));
    }
    let num = |k: &str| -> Result<f64, String> {
        get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("BLKBENCH without {k}"))
    };
    Ok(BlkResult {
        seqread: num("seqread")?,
        seqwrite: num("seqwrite")?,
        randread_iops: num("randread_iops")?,
        wall: 0.0,
        cpu: 0.0,
    })
}

/// Writes a raw disk of `mib` MiB filled with a non-zero pattern (so reads hit real data).
fn make_disk(path: &Path, mib: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (j as u64 ^ i).to_le_bytes()[0] | 1;
        }
        f.write_all(&block)?;
    }
    f.sync_all()
}

fn run_case(setup: &Setup, program: &Path, args: &[String]) -> Outcome<BlkResult> {
    let mut p = match VmProc::spawn(program, args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    let deadline = setup.deadline();
    // Where the benchmark starts: the boot is over.
    let start = match p.wait_line(0, "ANYVISOR-INIT-OK", deadline) {
        crate::vmproc::Wait::Found(i) => Some((
            i,
            p.lines.get(i).map(|l| l.at),
            crate::cpu::cpu_time(p.pid()),
        )),
        _ => None,
    };
    let from = start.map_or(0, |(i, _, _)| i);
    let w = p.wait_line(from, "BLKBENCH", deadline);
    let end_cpu = crate::cpu::cpu_time(p.pid());
    let out = match wait_outcome(&p, &w, setup.timeout_secs) {
        Outcome::Ok(i) => match parse_blkbench(&p.lines[i].text) {
            Ok(mut r) => {
                if let Some((_, Some(t0), cpu0)) = start
                    && let Some(line) = p.lines.get(i)
                {
                    r.wall = line.at.saturating_sub(t0).as_secs_f64();
                    if let (Some(c0), Some(c1)) = (cpu0, end_cpu) {
                        r.cpu = c1.saturating_sub(c0).as_secs_f64();
                    }
                }
                Outcome::Ok(r)
            }
            Err(e) => Outcome::Failed(e),
        },
        Outcome::Failed(m) => Outcome::Failed(m),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    };
    p.kill();
    out
}

/// The median of each figure over the runs that succeeded; the first problem if none did.
fn summarize(runs: Vec<Outcome<BlkResult>>) -> Outcome<BlkResult> {
    let ok: Vec<&BlkResult> = runs.iter().filter_map(|r| r.ok()).collect();
    let med =
        |g: fn(&BlkResult) -> f64| table::median(&ok.iter().map(|r| g(r)).collect::<Vec<_>>());
    match (
        med(|r| r.seqread),
        med(|r| r.seqwrite),
        med(|r| r.randread_iops),
        med(|r| r.wall),
        med(|r| r.cpu),
    ) {
        (Some(seqread), Some(seqwrite), Some(randread_iops), Some(wall), Some(cpu)) => {
            Outcome::Ok(BlkResult {
                seqread,
                seqwrite,
                randread_iops,
                wall,
                cpu,
            })
        }
        _ => runs
            .into_iter()
            .next()
            .unwrap_or_else(|| Outcome::Failed("no run".into())),
    }
}

pub fn run(setup: &Setup) {
    let append = cmdline("blkbench");
    let mut cmds = Vec::new();
    let mut rows = Vec::new();
    let disk = setup.scratch("blk.raw");
    let mut cases: Vec<(String, std::path::PathBuf, Vec<String>, bool)> = Vec::new();
    for b in &setup.backends {
        let mut args = anyvisor_args(setup, b, "bzImage", MEM_MIB, &append);
        args.extend(["--disk".into(), format!("{},format=raw", disk.display())]);
        cases.push((format!("anyvisor {b}"), setup.anyvisor.clone(), args, false));
    }
    if setup.qemu_enabled {
        let mut args = qemu_args(setup, "tcg", "bzImage", MEM_MIB, &append);
        args.extend([
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
            "-drive".into(),
            format!("id=d0,file={},format=raw,if=none", disk.display()),
        ]);
        cases.push(("QEMU 7.2 TCG".into(), setup.qemu.clone(), args, true));
    }
    // Rounds over all cases rather than all runs of one case in a row, so that a change in
    // the host's load hits every VMM alike.
    let mut results: Vec<Vec<Outcome<BlkResult>>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 0..setup.runs {
        for ((label, program, args, _), out) in cases.iter().zip(results.iter_mut()) {
            if round == 0 {
                cmds.push((label.clone(), command_line(program, args)));
            }
            eprintln!("[blk] {label} (run {}/{})", round + 1, setup.runs);
            let r = match make_disk(&disk, DISK_MIB) {
                Err(e) => Outcome::Failed(format!("cannot write {}: {e}", disk.display())),
                Ok(()) => run_case(setup, program, args),
            };
            eprintln!("[blk]   {r:?}");
            out.push(r);
        }
    }
    for ((label, _, _, peer), runs) in cases.into_iter().zip(results) {
        rows.push((label, summarize(runs), peer));
    }
    let _ = std::fs::remove_file(&disk);
    crate::print_header(
        &format!("virtio-blk inside the guest ({DISK_MIB} MiB raw file)"),
        setup,
    );
    let mut t = Table::new(&[
        "VMM",
        "seq read (MB/s)",
        "seq write (MB/s)",
        "4 KiB rand read (IOPS)",
        "read vs QEMU",
        "write vs QEMU",
        "IOPS vs QEMU",
        "bench wall (s)",
        "bench CPU (s)",
        "result",
    ]);
    let peer = rows.iter().find(|r| r.2).and_then(|r| r.1.ok().cloned());
    for (label, r, is_peer) in &rows {
        let v = r.ok();
        let p = if *is_peer { None } else { peer.as_ref() };
        let f = |g: fn(&BlkResult) -> f64| v.map(g);
        let pf = |g: fn(&BlkResult) -> f64| p.map(g);
        t.row(vec![
            label.clone(),
            f(|r| r.seqread).map_or("-".into(), |x| format!("{x:.1}")),
            f(|r| r.seqwrite).map_or("-".into(), |x| format!("{x:.1}")),
            f(|r| r.randread_iops).map_or("-".into(), |x| format!("{x:.0}")),
            table::ratio(f(|r| r.seqread), pf(|r| r.seqread)),
            table::ratio(f(|r| r.seqwrite), pf(|r| r.seqwrite)),
            table::ratio(f(|r| r.randread_iops), pf(|r| r.randread_iops)),
            f(|r| r.wall).map_or("-".into(), |x| format!("{x:.2}")),
            f(|r| r.cpu).map_or("-".into(), |x| format!("{x:.2}")),
            r.problem().unwrap_or_else(|| "ok".into()),
        ]);
    }
    print!("{t}");
    println!(
        "\nMeasured inside the guest by /bin/blkbench on /dev/vda with O_DIRECT: sequential write \
         then read of the first 32 MiB in 1 MiB requests (write ends with fsync), then 4 KiB \
         reads at random aligned offsets over the whole disk for 3 s. MB = 10^6 bytes. Host side: \
         raw file, default caching of each VMM. With --runs N, each figure is the median of the \
         runs that succeeded (the VMMs take turns). Above 1 is better here. Bench wall and CPU: \
         host seconds and VMM process CPU seconds (user + system, /proc/PID/stat) from \
         ANYVISOR-INIT-OK to the BLKBENCH line (the benchmark without the boot)."
    );
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_medians_of_successful_runs() {
        let r = |a: f64, b: f64, c: f64| {
            Outcome::Ok(BlkResult {
                seqread: a,
                seqwrite: b,
                randread_iops: c,
                wall: a + 1.0,
                cpu: b / 10.0,
            })
        };
        let s = summarize(vec![
            r(1.0, 30.0, 5.0),
            Outcome::Failed("x".into()),
            r(3.0, 10.0, 4.0),
            r(2.0, 20.0, 6.0),
        ]);
        assert_eq!(
            s.ok(),
            Some(&BlkResult {
                seqread: 2.0,
                seqwrite: 20.0,
                randread_iops: 5.0,
                wall: 3.0,
                cpu: 2.0,
            })
        );
        let bad = summarize(vec![Outcome::Timeout(3), Outcome::Failed("y".into())]);
        assert!(bad.ok().is_none());
        assert!(summarize(Vec::new()).ok().is_none());
    }

    #[test]
    fn blkbench_lines() {
        assert_eq!(
            parse_blkbench("BLKBENCH seqread=120.5 seqwrite=80 randread_iops=4000"),
            Ok(BlkResult {
                seqread: 120.5,
                seqwrite: 80.0,
                randread_iops: 4000.0,
                wall: 0.0,
                cpu: 0.0,
            })
        );
        assert_eq!(
            parse_blkbench("BLKBENCH error=open:/dev/vda:No-such-device"),
            Err("guest: open:/dev/vda:No-such-device".into())
        );
        assert!(parse_blkbench("BLKBENCH seqread=1 seqwrite=x randread_iops=3").is_err());
        assert!(parse_blkbench("MEMWORK OK").is_err());
    }
}
