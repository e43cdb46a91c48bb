//! `anyvisor import`'s descriptor parsers: the first byte picks one, the rest is its input.
//! 0: an OVF descriptor; 1: a VMware `.vmx`; 2: a VirtualBox `.vbox`; anything else: the rest
//! as an OVA (tar) file, read from a private temporary file. Disk references resolve to a
//! package member, as in an OVA, so no host file is named. Must never panic, allocate without
//! bound, or hang.
#![no_main]

use import::DiskLoc;
use libfuzzer_sys::fuzz_target;

fn member(name: &str) -> import::Result<DiskLoc> {
    import::check_relative(name, "disk")?;
    Ok(DiskLoc::Member {
        name: name.to_string(),
        offset: 0,
        size: 0,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which {
        0 => {
            let _ = import::ovf::describe(&text, &mut member);
        }
        1 => {
            let _ = import::vmx::describe_text(&text, &mut member);
        }
        2 => {
            let _ = import::vbox::describe_text(&text, &mut member);
        }
        _ => {
            let Ok(dir) = tempfile_dir() else { return };
            let ova = dir.join("fuzz.ova");
            if std::fs::write(&ova, rest).is_ok() {
                let _ = import::ova::describe(&ova);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
});

/// A private directory under /dev/shm (or the temporary directory) for one input.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("anyvisor-fuzz-ova-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
