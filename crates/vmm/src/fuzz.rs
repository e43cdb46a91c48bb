//! Entry point of the `cli_args` fuzz target (`fuzz/fuzz_targets/cli_args.rs`), also run by the
//! unit tests below. The `anyvisor` command line is parsed by clap in the `cli` binary, which
//! only splits it into strings; every value string (sizes, `--disk`/`--net`/`--vsock` specs,
//! serial, backend, CPU model, seccomp mode, `--incoming` address) and the `--config` JSON file
//! are parsed here, in [`crate::config`] (and `migrate::Address`). This runs each of them on
//! fuzzer strings, then merges a config file with flags into a [`RunRequest`] the way
//! `anyvisor run` does, and checks what was accepted.
//!
//! Input: fields separated by NUL bytes. Field 0 is the `--config` file's text (empty: none);
//! every other field is `NAME=VALUE` with NAME a long flag without its dashes (`memory=4G`,
//! `disk=/d.img,readonly=on`, `rng=`), parsed by clap as `run`'s flags (an unknown NAME is
//! refused as the command line refuses it); every field also goes through the single-value
//! parsers.
//! [`args_input`] writes this format. The `assert!`s are the fuzzer's oracle: nothing but the
//! fuzz target and the tests calls this module.

use crate::config::{
    BackendChoice, CpuModelName, DiskConfig, MAX_CPUS, MAX_MEMORY, NetConfig, RunOptions,
    RunRequest, SeccompChoice, SerialConfig, VsockConfig, parse_choice, parse_size,
};
use crate::error::Result;

/// An input for [`cli_args`]: the config file text and `(flag, value)` pairs.
pub fn args_input(config: &str, flags: &[(&str, &str)]) -> Vec<u8> {
    let mut v = config.as_bytes().to_vec();
    for (name, value) in flags {
        v.push(0);
        v.extend_from_slice(name.as_bytes());
        v.push(b'=');
        v.extend_from_slice(value.as_bytes());
    }
    v
}

/// Every single-value parser on `v`, with what must hold of what they accept.
fn parse_value(v: &str) {
    if let Ok(n) = parse_size(v)
        && n % 1024 == 0
    {
        let again = parse_size(&format!("{}K", n >> 10)).ok();
        assert_eq!(again, Some(n), "size {v:?} = {n} does not read back");
    }
    if let Ok(d) = DiskConfig::parse(v) {
        let p = d.path.to_string_lossy();
        assert!(
            !p.is_empty() && !p.contains(','),
            "disk path {p:?} from {v:?}"
        );
    }
    if let Ok(n) = NetConfig::parse(v) {
        assert!((1..16).contains(&n.tap.len()), "tap {:?} from {v:?}", n.tap);
    }
    if let Ok(s) = VsockConfig::parse(v) {
        assert!(s.cid >= 3 && s.cid != u32::MAX, "cid {} from {v:?}", s.cid);
        assert!(!s.uds.as_os_str().is_empty());
    }
    if let Ok(SerialConfig::File(p)) = SerialConfig::parse(v) {
        assert!(!p.as_os_str().is_empty());
    }
    let _ = parse_choice::<BackendChoice>(v);
    let _ = parse_choice::<CpuModelName>(v);
    let _ = parse_choice::<SeccompChoice>(v);
    if let Ok(a) = v.parse::<migrate::Address>() {
        let again = a.to_string().parse::<migrate::Address>().ok();
        assert_eq!(again.as_ref(), Some(&a), "address {v:?} does not read back");
    }
}

/// The command-line word for the field `NAME=VALUE`: `--NAME=VALUE`, or `--NAME` for a flag
/// that takes no value (`rng`, `verify`). An unknown NAME stays a flag clap refuses.
fn flag_word(name: &str, value: &str) -> String {
    use clap::Args;
    let run = RunOptions::augment_args(clap::Command::new("run"));
    let no_value = run
        .get_arguments()
        .find(|a| a.get_long() == Some(name))
        .and_then(|a| a.get_num_args())
        .is_some_and(|n| n.max_values() == 0);
    if no_value {
        format!("--{name}")
    } else {
        format!("--{name}={value}")
    }
}

/// Parses the input (see the module documentation) into what `anyvisor run` would do.
pub fn cli_args(data: &[u8]) -> Result<RunRequest> {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let config = fields.next().unwrap_or_default();
    let mut words = Vec::new();
    for field in fields {
        let (name, value) = field.split_once('=').unwrap_or((field, ""));
        parse_value(value);
        parse_value(field);
        words.push(flag_word(name, value));
    }
    // The flags go through clap as `anyvisor run` parses them.
    let flags = RunOptions::parse_flags(words)
        .map_err(|e| crate::Error::Usage(e.to_string().lines().next().unwrap_or("").into()))?;
    let mut options = if config.is_empty() {
        RunOptions::default()
    } else {
        match RunOptions::from_json(config) {
            Ok(f) => f,
            Err(e) => {
                return Err(crate::Error::bad_file("fuzz.json", e));
            }
        }
    };
    for v in options.disk.iter().chain(&options.net) {
        parse_value(v);
    }
    options.override_with(&flags)?;
    let request = options.into_request();
    match &request {
        Ok(RunRequest::Boot(cfg)) => {
            assert!((1..=MAX_CPUS).contains(&cfg.cpus), "{cfg:?}");
            assert!(cfg.memory > 0 && cfg.memory % hv::PAGE_SIZE == 0, "{cfg:?}");
            assert!(cfg.memory <= MAX_MEMORY, "{cfg:?}");
            assert!(!cfg.cmdline.contains('\0'), "{cfg:?}");
            // Snapshots record the config as JSON: it must read back as it was (the seccomp
            // mode is a setting of the process, not recorded).
            let json = serde_json::to_string(cfg);
            let back: Option<crate::VmConfig> =
                json.ok().and_then(|j| serde_json::from_str(&j).ok());
            let mut expected = cfg.clone();
            expected.seccomp = Default::default();
            assert_eq!(back, Some(expected), "the config does not survive JSON");
        }
        Ok(_) => {}
        Err(e) => {
            // Every refusal has a message and an exit status.
            let _ = (e.to_string(), e.exit_code());
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line of the devices e2e test, with a config file.
    fn devices_run() -> Vec<u8> {
        args_input(
            r#"{"kernel":"guest/out/bzImage","memory":"512M","cpus":2,"disk":["/tmp/a.img"]}"#,
            &[
                ("initrd", "guest/out/initramfs.cpio.gz"),
                (
                    "cmdline",
                    "console=ttyS0 reboot=k panic=-1 anyvisor.test=devices",
                ),
                ("backend", "emu"),
                ("serial", "null"),
                ("disk", "/tmp/vda.img,format=raw"),
                ("disk", "/tmp/vdb.qcow2,readonly=on,format=qcow2"),
                ("net", "tap=tap0,mac=52:54:00:12:34:56"),
                ("vsock", "3,uds=/tmp/v.sock"),
                ("rng", ""),
                ("memory", "1G"),
            ],
        )
    }

    #[test]
    fn a_real_command_line_boots() {
        let Ok(RunRequest::Boot(cfg)) = cli_args(&devices_run()) else {
            panic!("refused");
        };
        assert_eq!((cfg.cpus, cfg.memory), (2, 1 << 30));
        // Flags replace the file's list.
        assert_eq!(cfg.disks.len(), 2);
        assert!(cfg.disks[1].readonly);
        assert_eq!(cfg.nets[0].mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(cfg.vsock.as_ref().map(|v| v.cid), Some(3));
        assert!(cfg.rng);
        assert!(matches!(
            cli_args(&args_input("", &[("incoming", "unix:/tmp/m.sock")])),
            Ok(RunRequest::Incoming { .. })
        ));
        let k = ("kernel", "/k");
        assert!(cli_args(&args_input("", &[k, ("memory", "512M")])).is_ok());
        assert!(cli_args(&args_input("", &[k, ("memory", "12X")])).is_err());
        assert!(cli_args(&args_input("{}", &[k])).is_ok());
        assert!(cli_args(&args_input("{\"kernal\":\"/x\"}", &[k])).is_err());
    }

    #[test]
    fn survives_mutations() {
        let input = devices_run();
        for i in 0..input.len() {
            for f in [|_: u8| 0u8, |_: u8| b',', |_: u8| b'9', |b: u8| b ^ 0x80] {
                let mut m = input.clone();
                m[i] = f(m[i]);
                let _ = cli_args(&m);
            }
            let _ = cli_args(&input[..i]);
        }
    }
}
