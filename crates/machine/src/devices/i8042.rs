//! Just enough of an i8042 keyboard controller for Linux: no keyboard, no mouse, and a reset
//! line. The status register reads 0 unless a command left a byte in the output buffer.

use serde::{Deserialize, Serialize};

use super::PlatformEvent;

const STATUS_OBF: u8 = 0x01;
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_RESET: u8 = 0xfe;

/// Saved i8042 state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub config: u8,
    /// A command waiting for its data byte on port 0x60 (0x60 or 0xd1).
    pub expecting: Option<u8>,
    /// Byte waiting in the output buffer.
    pub output: Option<u8>,
}

impl I8042State {
    pub fn validate(&self) -> Result<(), String> {
        match self.expecting {
            None | Some(CMD_WRITE_CONFIG) | Some(CMD_WRITE_OUTPUT) => Ok(()),
            Some(c) => Err(format!(
                "i8042 cannot be waiting for data of command {c:#x}"
            )),
        }
    }
}

#[derive(Default)]
pub struct I8042 {
    s: I8042State,
}

impl I8042 {
    pub fn read_status(&self) -> u8 {
        if self.s.output.is_some() {
            STATUS_OBF
        } else {
            0
        }
    }

    pub fn read_data(&mut self) -> u8 {
        self.s.output.take().unwrap_or(0)
    }

    pub fn write_command(&mut self, cmd: u8) -> Option<PlatformEvent> {
        self.s.expecting = None;
        match cmd {
            CMD_READ_CONFIG => self.s.output = Some(self.s.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT => self.s.expecting = Some(cmd),
            CMD_SELF_TEST => self.s.output = Some(0x55),
            CMD_RESET => return Some(PlatformEvent::Reset),
            _ => {}
        }
        None
    }

    pub fn write_data(&mut self, value: u8) -> Option<PlatformEvent> {
        match self.s.expecting.take() {
            Some(CMD_WRITE_CONFIG) => self.s.config = value,
            // Output port bit 0 low pulls the CPU reset line.
            Some(CMD_WRITE_OUTPUT) if value & 1 == 0 => return Some(PlatformEvent::Reset),
            _ => {}
        }
        None
    }

    pub fn state(&self) -> I8042State {
        self.s.clone()
    }

    pub fn restore(&mut self, s: &I8042State) -> Result<(), String> {
        s.validate()?;
        self.s = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_and_commands() {
        let mut k = I8042::default();
        assert_eq!(k.read_status(), 0);
        assert_eq!(k.write_command(0xfe), Some(PlatformEvent::Reset));
        assert_eq!(k.write_command(0x60), None);
        assert_eq!(k.write_data(0x47), None);
        assert_eq!(k.write_command(0x20), None);
        assert_eq!(k.read_status(), 1);
        assert_eq!(k.read_data(), 0x47);
        assert_eq!(k.read_status(), 0);
        k.write_command(0xd1);
        assert_eq!(k.write_data(0xfe), Some(PlatformEvent::Reset));
    }

    #[test]
    fn state_validation() {
        let mut s = I8042State::default();
        assert!(s.validate().is_ok());
        s.expecting = Some(0x20);
        assert!(s.validate().is_err());
    }
}
