//! `anyvisor`: the command line of the VMM (contract: the CLI spec).
//!
//! Every failure ends as one `error: ...` line on stderr and the exit status chosen by
//! [`vmm::Error::exit_code`]: 0 success, 1 guest crash or internal error, 2 bad usage or input.

mod args;
mod import_bar;
mod log;
mod progress;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Command};
use vmm::api::{self, client};

fn main() -> ExitCode {
    install_panic_hook();
    log::install_from_env();
    // Test builds only (the `test-hooks` feature); a no-op otherwise.
    vmm::test_hooks::at_start();
    // The matches are kept: they tell which `run` flags were given, to lay over a config file.
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_error(&e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e.format(&mut Cli::command())),
    };
    let code = match run(cli, &matches) {
        Ok(code) => code,
        Err(e) => {
            vmm::exit::cleanup();
            eprintln!("error: {}", vmm::error::report(&e));
            e.exit_code()
        }
    };
    vmm::exit::cleanup();
    ExitCode::from(code)
}

/// Help and version go to stdout with status 0; every other clap error is reduced to its
/// first line (`error: ...`) with status 2.
fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("error: a subcommand is required (see anyvisor --help)");
            ExitCode::from(vmm::error::EXIT_USAGE)
        }
        _ => {
            eprintln!("{}", first_line(&e.to_string()));
            ExitCode::from(vmm::error::EXIT_USAGE)
        }
    }
}

/// The one-line form of a clap message: its first line, with the indented list that follows a
/// line ending in `:` folded into it.
fn first_line(text: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let mut line = lines.next().unwrap_or("").trim_end().to_string();
    if line.ends_with(':') {
        let items: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        if !items.is_empty() {
            line.push(' ');
            line.push_str(&items.join(", "));
        }
    }
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

/// A panic anywhere (including a vCPU thread) ends the process with one line and status 1,
/// after restoring the terminal and removing the API socket. Only the main thread removes the
/// socket: the seccomp filters of vCPU, device and migration threads refuse `unlink`, and a
/// refused call would kill the process before the message is printed.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if std::thread::current().name() == Some("main") {
            vmm::exit::cleanup();
        } else {
            vmm::exit::restore_terminal();
        }
        eprintln!(
            "error: internal error: {}{place}",
            msg.replace(['\n', '\r'], " ")
        );
        std::process::exit(i32::from(vmm::error::EXIT_FAILURE));
    }));
}

/// Commands other than `run` and `snapshot` (which handle SIGTERM, SIGINT and SIGHUP
/// themselves: `run` at checkpoints before its VM launches, then in the VM's main loop) end on those signals with one `error:` line and status 1 instead of dying
/// without a word. The signals are blocked in this thread (and so in every thread it starts)
/// and taken by one waiting thread, so no system call of the command is interrupted half-way.
fn end_on_signals(what: &'static str) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    if set.thread_block().is_err() {
        return;
    }
    let waiter = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                vmm::exit::cleanup();
                eprintln!(
                    "error: stopped by {}{what}",
                    vmm::exit::signal_name(sig as i32)
                );
                std::process::exit(i32::from(vmm::error::EXIT_FAILURE));
            }
        });
    if waiter.is_err() {
        // No waiter: the signals must not stay blocked, or they could not end the command.
        let _ = set.thread_unblock();
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> vmm::Result<u8> {
    match &cli.command {
        Command::Run(_) | Command::Snapshot(_) => {}
        Command::Import(_) => end_on_signals(": the import's output is incomplete"),
        Command::SnapshotInfo(_) => end_on_signals(""),
        Command::Info(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Shutdown(_)
        | Command::Migrate(_) => {
            end_on_signals(" before the command completed; what the VMM did is unknown")
        }
    }
    match cli.command {
        Command::Run(flags) => {
            // From here a termination signal is noted, not fatal: each step before the VM
            // launches (config, reading a disk to boot, loading a restore) checks for it and
            // ends with one `error:` line; once the VM runs, its main loop handles it.
            vmm::exit::install_signal_handlers().map_err(|source| vmm::Error::Io {
                op: "cannot install signal handlers",
                source,
            })?;
            let options = match (&flags.config, matches.subcommand_matches("run")) {
                (Some(file), Some(given)) => {
                    let mut options = vmm::RunOptions::from_file(file)?;
                    options.override_with(given)?;
                    options
                }
                _ => *flags,
            };
            // `--disk` without `--kernel`: the kernel the disk holds (docs/boot-from-disk.md).
            let (options, extracted) = vmm::diskboot::prepare(options)?;
            if extracted.is_some() {
                vmm::exit::stop_if_signalled()?;
            }
            if let Some(x) = &extracted {
                tracing::info!("booting {} (kernel {})", x.chosen, x.kernel_path);
            }
            let boot_entry = extracted.as_ref().map(|x| x.chosen.clone());
            let reason = vmm::run(options.into_request()?, boot_entry);
            drop(extracted);
            let reason = reason?;
            Ok(reason.exit_code())
        }
        Command::Info(a) => {
            let body = vmm::api::client::info(&a.api_socket)?;
            print_line(&body.unwrap_or_default());
            Ok(0)
        }
        Command::Pause(a) => {
            client::put_empty(&a.api_socket, api::path::PAUSE)?;
            Ok(0)
        }
        Command::Resume(a) => {
            client::put_empty(&a.api_socket, api::path::RESUME)?;
            Ok(0)
        }
        Command::Shutdown(a) => {
            let request = api::ShutdownRequest {
                timeout: a.timeout,
                force: a.force,
            };
            client::put(&a.api_socket, &request)?;
            // The VMM removes its socket as it exits: wait for that, a little longer than it
            // waits for the guest.
            let secs = if a.force {
                0
            } else {
                a.timeout.unwrap_or(vmm::api::SHUTDOWN_TIMEOUT_DEFAULT)
            };
            wait_gone(&a.api_socket, Duration::from_secs(secs.saturating_add(15)))?;
            Ok(0)
        }
        Command::Snapshot(a) => {
            let request = api::SnapshotRequest {
                output: absolute(&a.output)?,
                stop: a.stop,
                overwrite: a.force,
            };
            client::put_interruptible(&a.api_socket, &request)?;
            Ok(0)
        }
        Command::Migrate(a) => {
            let key = a.migration_key.as_deref().map(absolute).transpose()?;
            if let Some(w) = key.as_deref().and_then(migrate_key_warning) {
                eprintln!("warning: {w}");
            }
            let request = api::MigrateRequest {
                to: a.to.clone(),
                migration_key_file: key,
                max_downtime_ms: a.max_downtime_ms,
            };
            let shown = progress::Shown::start(&a.api_socket);
            let out = client::put(&a.api_socket, &request);
            drop(shown);
            let out = out?;
            if let Some(line) = out {
                print_line(&line);
            }
            Ok(0)
        }
        Command::Import(a) => import(&a),
        Command::SnapshotInfo(a) => {
            let info = vmm::snapshot::info(&a.file, a.verify)?;
            print_line(&info.to_string());
            Ok(0)
        }
    }
}

/// The group/other-readable warning for a migration key file (the VMM reads it, but its
/// stderr is not this command's).
fn migrate_key_warning(path: &std::path::Path) -> Option<String> {
    vmm::migration::key_exposure_warning(path)
}

/// Prints one line of output. A reader that went away (`anyvisor info ... | head -c 100`) is
/// not an error of ours: unlike `println!`, this does not panic on a closed pipe.
fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// `anyvisor import`: converts the source, prints one line per mapped or dropped device and
/// per file written.
fn import(a: &args::ImportArgs) -> vmm::Result<u8> {
    let opts = ::import::Options {
        source: a.source.clone(),
        output: a.output.clone(),
        force: a.force,
        tap_prefix: a.tap_prefix.clone().unwrap_or_else(|| "avtap".into()),
        backing: a.backing,
    };
    let mut bar = import_bar::ImportBar::default();
    let report = ::import::import(&opts, &mut bar).map_err(|e| match e {
        ::import::Error::Write { path, source } => vmm::Error::OpenOutput { path, source },
        other => vmm::Error::Usage(vmm::error::report(&other)),
    })?;
    for line in &report.lines {
        println!("{line}");
    }
    Ok(0)
}

/// Waits until nothing answers on `socket` any more (the VMM has exited), at most `limit`.
fn wait_gone(socket: &std::path::Path, limit: Duration) -> vmm::Result<()> {
    let start = Instant::now();
    // The socket file goes when the VMM exits; a VMM killed outright leaves it, but then
    // nothing accepts on it.
    while socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
        if start.elapsed() > limit {
            return Err(vmm::Error::Internal(format!(
                "the vm at {} was still running {} s after the shutdown request",
                socket.display(),
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Paths sent to the VMM are made absolute: its working directory is not ours.
fn absolute(p: &std::path::Path) -> vmm::Result<std::path::PathBuf> {
    std::path::absolute(p).map_err(|source| vmm::Error::Io {
        op: "cannot resolve path",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_messages_become_one_line() {
        assert_eq!(
            first_line(
                "error: the following required arguments were not provided:\n  --api-socket <PATH>\n\nUsage: x\n"
            ),
            "error: the following required arguments were not provided: --api-socket <PATH>"
        );
        assert_eq!(
            first_line("error: unexpected argument '--x' found\n\n  tip: y\n"),
            "error: unexpected argument '--x' found"
        );
        assert_eq!(first_line("oops"), "error: oops");
        assert_eq!(first_line(""), "error: ");
    }
}
