//! The receiving side: a state machine that treats the stream as hostile
//! (docs/migration-protocol.md §7).

use std::io::{Read, Write};

use crate::pages;
use crate::wire::{self, Channel, Frame, Kind, Role};
use crate::{DestinationVm, Error, Key, MAX_STATE_BYTES, Result};

/// A VM whose memory and final state have fully arrived. The VMM restores `state`, resumes
/// the guest, then calls [`Confirmation::resumed`], which lets the source exit.
pub struct Arrived<D> {
    pub vm: D,
    /// The source's final vCPU and device state, as its VMM produced it.
    pub state: Vec<u8>,
    /// The source's description (the JSON `prepare` was called with).
    pub description: serde_json::Value,
    pub confirmation: Confirmation,
}

/// The last step of a migration: tell the source the VM runs here (it then exits), or that it
/// does not (it then resumes the VM). Dropping it unused counts as failure.
pub struct Confirmation {
    ch: Option<Channel>,
}

impl Confirmation {
    /// Tells the source the VM is running here. Call only after the guest was resumed.
    ///
    /// An `Err` means the source may not have heard it: it will resume its copy of the VM
    /// unless the message got through (see the protocol spec, §8).
    pub fn resumed(mut self) -> Result<()> {
        match self.ch.take() {
            Some(mut ch) => ch.send(Kind::Resumed, &[]),
            None => Ok(()),
        }
    }

    /// Tells the source the VM could not be started here, so it resumes its copy.
    pub fn abort(mut self, reason: &str) {
        if let Some(mut ch) = self.ch.take() {
            ch.send_error(reason);
        }
    }
}

impl Drop for Confirmation {
    fn drop(&mut self) {
        if let Some(mut ch) = self.ch.take() {
            ch.send_error("the destination did not resume the VM");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Handshake done, waiting for the source's description.
    Hello,
    /// Receiving page batches and round ends.
    Memory,
    /// Receiving the final state.
    State,
}

impl Phase {
    fn during(self) -> &'static str {
        match self {
            Phase::Hello => "before Hello",
            Phase::Memory => "while receiving memory",
            Phase::State => "while receiving the final state",
        }
    }
}

/// Receives a VM over an already connected `stream` (the caller sets its timeouts; see
/// [`receive`](crate::receive)). Every failure is reported to the source when possible and
/// returned as `Err`; no input makes this panic.
pub fn receive_on<S, D, F, E>(stream: S, key: Option<&Key>, prepare: F) -> Result<Arrived<D>>
where
    S: Read + Write + Send + 'static,
    D: DestinationVm,
    F: FnOnce(&serde_json::Value) -> std::result::Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut ch = Channel::new(Box::new(stream), Role::Destination);
    let result =
        wire::handshake_destination(&mut ch, key).and_then(|()| run(&mut ch, &|| false, prepare));
    finish(ch, result)
}

/// Receives a VM over a channel whose handshake is done ([`crate::gate`]); `stop` is asked
/// before every message.
pub(crate) fn receive_admitted<D, F, E>(
    mut ch: Channel,
    stop: &dyn Fn() -> bool,
    prepare: F,
) -> Result<Arrived<D>>
where
    D: DestinationVm,
    F: FnOnce(&serde_json::Value) -> std::result::Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = run(&mut ch, stop, prepare);
    finish(ch, result)
}

/// Whether the source should be told about `e` with an Error message: not when it is gone or
/// already knows (its own failure, a refusal or version mismatch it was sent), and not when the
/// failure is authentication before a shared session key exists.
pub(crate) fn tell_peer(e: &Error, ch: &Channel) -> bool {
    !matches!(
        e,
        Error::PeerGone | Error::Peer(_) | Error::Refused(_) | Error::Version { .. }
    ) && (ch.is_authenticated() || !matches!(e, Error::Auth(_)))
}

fn finish<D>(
    mut ch: Channel,
    result: Result<(D, Vec<u8>, serde_json::Value)>,
) -> Result<Arrived<D>> {
    match result {
        Ok((vm, state, description)) => Ok(Arrived {
            vm,
            state,
            description,
            confirmation: Confirmation { ch: Some(ch) },
        }),
        Err(e) => {
            if tell_peer(&e, &ch) {
                ch.send_error(&hv::Chain(&e).to_string());
            }
            Err(e)
        }
    }
}

/// Everything after the handshake.
fn run<D, F, E>(
    ch: &mut Channel,
    stop: &dyn Fn() -> bool,
    prepare: F,
) -> Result<(D, Vec<u8>, serde_json::Value)>
where
    D: DestinationVm,
    F: FnOnce(&serde_json::Value) -> std::result::Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let f = ch.recv()?;
    if f.kind != Kind::Hello {
        return Err(wire::unexpected(&f, Phase::Hello.during()));
    }
    let description: serde_json::Value =
        serde_json::from_slice(&f.payload).map_err(Error::Description)?;
    let vm = match prepare(&description) {
        Ok(vm) => vm,
        Err(reason) => {
            let reason: Box<dyn std::error::Error + Send + Sync> = reason.into();
            let reason = wire::reason_text(hv::Chain(&*reason).to_string().as_bytes());
            ch.send(Kind::Refuse, reason.as_bytes())?;
            return Err(Error::Refused(reason));
        }
    };
    ch.send(Kind::Ready, &[])?;

    let mut phase = Phase::Memory;
    let mut next_round: u32 = 0;
    let mut state: Vec<u8> = Vec::new();
    loop {
        if stop() {
            return Err(Error::Stopped);
        }
        let f: Frame = ch.recv()?;
        match (phase, f.kind) {
            (Phase::Memory, Kind::MemoryPages) => {
                pages::apply_batch(vm.memory(), &f.payload)?;
            }
            (Phase::Memory, Kind::RoundEnd) => {
                let round = f
                    .payload
                    .first_chunk::<4>()
                    .filter(|_| f.payload.len() == 12)
                    .map(|b| u32::from_le_bytes(*b))
                    .ok_or_else(|| Error::Protocol("bad RoundEnd".into()))?;
                if round != next_round {
                    return Err(Error::Protocol(format!(
                        "RoundEnd {round} out of order (expected {next_round})"
                    )));
                }
                next_round = next_round
                    .checked_add(1)
                    .ok_or_else(|| Error::Protocol("too many rounds".into()))?;
            }
            (Phase::Memory, Kind::StateBlob) | (Phase::State, Kind::StateBlob)
                if next_round > 0 =>
            {
                phase = Phase::State;
                if state.len() + f.payload.len() > MAX_STATE_BYTES {
                    return Err(Error::Protocol(format!(
                        "final state exceeds {MAX_STATE_BYTES} bytes"
                    )));
                }
                state.extend_from_slice(&f.payload);
            }
            (Phase::State, Kind::Complete) => {
                let len = <[u8; 8]>::try_from(f.payload.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| Error::Protocol("bad Complete".into()))?;
                if len != state.len() as u64 {
                    return Err(Error::Protocol(format!(
                        "Complete announces {len} state bytes, {} arrived",
                        state.len()
                    )));
                }
                return Ok((vm, state, description));
            }
            (p, _) => return Err(wire::unexpected(&f, p.during())),
        }
    }
}
