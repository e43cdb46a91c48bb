//! The error type of the VMM and the one place that maps errors to process exit codes.

use std::path::PathBuf;

/// Exit status: the guest powered off or reset, or the VM was handed off.
pub const EXIT_OK: u8 = 0;
/// Exit status: the guest crashed, or an internal error.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line or config file is wrong.
    #[error("{0}")]
    Usage(String),
    /// A file named by the user cannot be opened or read.
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file named by the user has the wrong content.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// A file named by the user has the wrong content, as the parser's error (the source)
    /// says: the typed form of [`Error::BadFile`] ([`Error::bad_file`]).
    #[error("{}", path.display())]
    BadFileWith {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file the user asked the VMM to create or append to cannot be opened.
    #[error("cannot open {}", path.display())]
    OpenOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A feature that later work provides.
    #[error("{0} is not supported yet")]
    NotSupported(&'static str),
    /// A setting the chosen backend cannot provide.
    #[error("{0}")]
    Unsupported(String),
    /// A saved or arriving VM cannot run on this backend, as the backend's check (the source)
    /// says (the typed form of the [`Error::Unsupported`] such a VM gets otherwise).
    #[error("cannot run this VM (CPU model {model}) here: backend {backend}")]
    CannotRunHere {
        model: String,
        backend: hv::BackendKind,
        #[source]
        source: hv::Error,
    },
    /// The backend refused or failed.
    #[error(transparent)]
    Hypervisor(#[from] hv::Error),
    /// Setting up the VM failed on something the user supplied (kernel, initrd, memory size).
    /// Where another error is the cause, use [`Error::SetupWith`] ([`Error::setup`]).
    #[error("{0}")]
    Setup(String),
    /// Setting up the VM failed; `what` names the step, the error behind it is the source
    /// (the typed form of [`Error::Setup`], same exit status).
    #[error("{what}")]
    SetupWith {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The command line or config file is wrong, as another error says (the typed form of
    /// [`Error::Usage`], same exit status).
    #[error("{what}")]
    UsageWith {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The `--incoming` address, the migration key or the listener cannot be used, as the
    /// migration crate's error (and its causes) says.
    #[error(transparent)]
    Incoming(migrate::Error),
    /// A disk image cannot be opened as configured (its error names the file and the field).
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// Assembling the VM (boot, restore, incoming migration) failed on what it was given.
    #[error(transparent)]
    Build(crate::builder::BuildError),
    /// The API socket cannot be created.
    #[error("cannot listen on api socket {}", path.display())]
    ApiListen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A control command cannot reach the VM.
    #[error("cannot connect to api socket {}", path.display())]
    ApiConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VM answered a control command with an error (HTTP status, message).
    #[error("{message}")]
    ApiRequest { status: u16, message: String },
    /// The guest's CPU shut down (triple fault).
    #[error("guest triple fault")]
    TripleFault,
    /// A vCPU stopped on something the backend cannot complete.
    #[error("vcpu {id}")]
    Vcpu {
        id: u32,
        #[source]
        source: hv::Error,
    },
    /// A host operation failed.
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The VMM was told to end by a signal; the guest did not shut down.
    #[error("stopped by {0}")]
    Signal(String),
    /// A bug or an unexpected host condition.
    #[error("internal error: {0}")]
    Internal(String),
    /// A bug or an unexpected host condition, with the error behind it as the source.
    #[error("internal error: {what}")]
    InternalWith {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The guest kernel panicked (its console said `Kernel panic - not syncing: WHAT`), then
    /// reset or halted.
    #[error("the guest kernel panicked: {0}")]
    GuestPanic(String),
    /// The power button was pressed and the guest did not power off in time.
    #[error(
        "the guest did not power off within {secs} s of the ACPI power button ({by}); stopped it"
    )]
    ShutdownTimeout { secs: u64, by: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// [`Error::BadFileWith`]: the content of `path` is wrong because of `source`.
    pub fn bad_file(
        path: impl Into<PathBuf>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::BadFileWith {
            path: path.into(),
            source: source.into(),
        }
    }

    /// [`Error::SetupWith`]: `what` failed because of `source`.
    pub fn setup(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::SetupWith {
            what: what.into(),
            source: source.into(),
        }
    }

    /// [`Error::UsageWith`]: `what` is wrong because of `source`.
    pub fn usage(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::UsageWith {
            what: what.into(),
            source: source.into(),
        }
    }

    /// [`Error::InternalWith`]: `what` failed because of `source`.
    pub fn internal(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::InternalWith {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The process exit status for this error: [`EXIT_USAGE`] for bad usage or input,
    /// [`EXIT_FAILURE`] for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_)
            | Error::ReadFile { .. }
            | Error::BadFile { .. }
            | Error::BadFileWith { .. }
            | Error::OpenOutput { .. }
            | Error::NotSupported(_)
            | Error::Unsupported(_)
            | Error::CannotRunHere { .. }
            | Error::Setup(_)
            | Error::SetupWith { .. }
            | Error::UsageWith { .. }
            | Error::Disk(_)
            | Error::Incoming(_)
            | Error::Build(_)
            | Error::ApiListen { .. }
            | Error::ApiConnect { .. } => EXIT_USAGE,
            Error::Hypervisor(e) => match e {
                hv::Error::Unavailable { .. } | hv::Error::Incompatible(_) => EXIT_USAGE,
                _ => EXIT_FAILURE,
            },
            // 501: the VM does not offer that operation (yet): like an unsupported option.
            Error::ApiRequest { status, .. } => {
                if (400..500).contains(status) || *status == 501 {
                    EXIT_USAGE
                } else {
                    EXIT_FAILURE
                }
            }
            Error::TripleFault
            | Error::Vcpu { .. }
            | Error::Io { .. }
            | Error::Signal(_)
            | Error::Internal(_)
            | Error::InternalWith { .. }
            | Error::GuestPanic(_)
            | Error::ShutdownTimeout { .. } => EXIT_FAILURE,
        }
    }
}

/// The error and its chain of causes as one line, each cause once:
/// `cannot read /x: No such file or directory (os error 2)`.
///
/// No error in the workspace prints its own source, so each cause is simply appended.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    // One line, whatever the messages contain.
    hv::Chain(err).to_string().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "boom")
    }

    #[test]
    fn exit_codes() {
        let usage = [
            Error::Usage("x".into()),
            Error::ReadFile {
                path: "/k".into(),
                source: io(std::io::ErrorKind::NotFound),
            },
            Error::BadFile {
                path: "/k".into(),
                reason: "not a kernel".into(),
            },
            Error::NotSupported("--restore"),
            Error::Hypervisor(hv::Error::Unavailable {
                backend: "kvm",
                reason: "no".into(),
                source: None,
            }),
            Error::Hypervisor(hv::Error::Incompatible("x".into())),
            Error::ApiConnect {
                path: "/s".into(),
                source: io(std::io::ErrorKind::NotFound),
            },
            Error::ApiRequest {
                status: 409,
                message: "x".into(),
            },
            Error::ApiRequest {
                status: 501,
                message: "snapshot is not supported yet".into(),
            },
        ];
        for e in &usage {
            assert_eq!(e.exit_code(), EXIT_USAGE, "{e}");
        }
        let disk = disk::open(
            std::path::Path::new("/nonexistent/d.img"),
            Default::default(),
        )
        .err()
        .unwrap();
        for e in [
            Error::setup("cannot create guest memory", "no room"),
            Error::usage("--seccomp", io(std::io::ErrorKind::InvalidInput)),
            Error::bad_file("/vm.json", "unknown field `cpu`"),
            Error::Disk(disk),
        ] {
            assert_eq!(e.exit_code(), EXIT_USAGE, "{e}");
        }
        assert_eq!(
            Error::internal("x", "y").exit_code(),
            EXIT_FAILURE,
            "internal"
        );
        let failure = [
            Error::TripleFault,
            Error::Vcpu {
                id: 1,
                source: hv::Error::Unhandled("x".into()),
            },
            Error::Internal("x".into()),
            Error::Hypervisor(hv::Error::InvalidState("x".into())),
            Error::ApiRequest {
                status: 500,
                message: "x".into(),
            },
        ];
        for e in &failure {
            assert_eq!(e.exit_code(), EXIT_FAILURE, "{e}");
        }
    }

    #[test]
    fn report_joins_chain_once() {
        let e = Error::ReadFile {
            path: "/k".into(),
            source: io(std::io::ErrorKind::NotFound),
        };
        assert_eq!(report(&e), "cannot read /k: boom");
        let e = Error::Hypervisor(hv::Error::Unavailable {
            backend: "kvm",
            reason: "cannot open /dev/kvm".into(),
            source: Some(io(std::io::ErrorKind::PermissionDenied)),
        });
        assert_eq!(report(&e), "kvm is not usable: cannot open /dev/kvm: boom");
        // hv::Error::Backend names the call; the OS error comes once, from the chain.
        let e = Error::Vcpu {
            id: 0,
            source: hv::Error::Backend {
                op: "KVM_RUN",
                source: io(std::io::ErrorKind::Other),
            },
        };
        assert_eq!(report(&e), "vcpu 0: KVM_RUN failed: boom");
        assert_eq!(report(&Error::Usage("a\nb".into())), "a b");
        // The typed forms of Setup, Usage and Internal print their cause after their step.
        assert_eq!(
            report(&Error::setup(
                "cannot create guest memory",
                io(std::io::ErrorKind::OutOfMemory)
            )),
            "cannot create guest memory: boom"
        );
        assert_eq!(
            report(&Error::usage("malformed final state", "expected value")),
            "malformed final state: expected value"
        );
        assert_eq!(
            report(&Error::bad_file(
                "/vm.json",
                io(std::io::ErrorKind::InvalidData)
            )),
            "/vm.json: boom"
        );
        assert_eq!(
            report(&Error::internal("cannot map the device", "EBUSY")),
            "internal error: cannot map the device: EBUSY"
        );
        // A disk error shows as the disk layer writes it, each cause once.
        let e = disk::open(
            std::path::Path::new("/nonexistent/d.img"),
            Default::default(),
        )
        .err()
        .unwrap();
        let want = report(&e);
        assert_eq!(report(&Error::from(e)), want);
        assert!(want.contains("/nonexistent/d.img"), "{want}");
    }
}
