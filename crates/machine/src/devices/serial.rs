//! The 16550A serial port (COM1) on top of vm-superio, with host input buffering.
//!
//! vm-superio's receive FIFO holds 64 bytes. Input beyond that waits in a host-side buffer of
//! up to [`MAX_PENDING_INPUT`] bytes and is moved into the FIFO each time the guest reads the
//! receive register; input beyond that limit is dropped and counted.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};

use super::IrqLine;
use hv::Interrupt as _;

/// Size of vm-superio's receive FIFO.
pub const FIFO_SIZE: usize = 64;
/// Host input held back while the FIFO is full.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

const DATA: u8 = 0;
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_VALID: u8 = 0x0f;
const LSR_DR: u8 = 0x01;
const LSR_THRE_TEMT: u8 = 0x60;
/// Modem status vm-superio always reports outside loopback: DCD, DSR, CTS.
const MSR_FIXED: u8 = 0xb0;

/// The serial port's interrupt: an edge on its IOAPIC pin, unless muted (while a saved UART is
/// rebuilt, see [`SerialDevice::restore`]).
pub struct SerialIrq {
    line: IrqLine,
    muted: Arc<AtomicBool>,
}

/// Why a saved serial state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A field is out of range (the reason names it).
    #[error("{0}")]
    Invalid(String),
    /// vm-superio refused the state.
    #[error("serial state rejected")]
    Rejected(#[source] vm_superio::serial::Error<std::convert::Infallible>),
}

impl Trigger for SerialIrq {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        if !self.muted.load(Ordering::Relaxed) {
            self.line.trigger();
        }
        Ok(())
    }
}

/// Where guest output goes; shared so the UART can be rebuilt on restore.
#[derive(Clone)]
pub struct SerialOut(pub Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Saved serial port state. Restored only through [`SerialState::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    /// Interrupt identification without the FIFO bits: 0x01 (none) or a set of 0x02 (THR empty)
    /// and 0x04 (received data).
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Receive FIFO contents, oldest first (at most 64 bytes).
    pub rx_fifo: Vec<u8>,
    /// Host input not yet in the FIFO (at most [`MAX_PENDING_INPUT`] bytes).
    pub pending_input: Vec<u8>,
}

impl SerialState {
    pub fn validate(&self) -> Result<(), String> {
        if self.interrupt_enable & !IER_VALID != 0 {
            return Err(format!(
                "serial IER {:#x} has reserved bits",
                self.interrupt_enable
            ));
        }
        let iir = self.interrupt_identification;
        if !(iir == 0x01 || (iir != 0 && iir & !0x06 == 0)) {
            return Err(format!("serial IIR {iir:#x} is not a reachable value"));
        }
        if self.line_status & !(LSR_DR | LSR_THRE_TEMT) != 0
            || self.line_status & LSR_THRE_TEMT != LSR_THRE_TEMT
        {
            return Err(format!("serial LSR {:#x} is invalid", self.line_status));
        }
        if (self.line_status & LSR_DR != 0) == self.rx_fifo.is_empty() {
            return Err("serial LSR data-ready bit disagrees with the FIFO".into());
        }
        if self.modem_status != MSR_FIXED {
            return Err(format!("serial MSR {:#x} is invalid", self.modem_status));
        }
        if self.rx_fifo.len() > FIFO_SIZE {
            return Err(format!(
                "serial FIFO holds {} bytes, the limit is {FIFO_SIZE}",
                self.rx_fifo.len()
            ));
        }
        if self.pending_input.len() > MAX_PENDING_INPUT {
            return Err(format!(
                "serial pending input is {} bytes, the limit is {MAX_PENDING_INPUT}",
                self.pending_input.len()
            ));
        }
        Ok(())
    }
}

impl Default for SerialState {
    fn default() -> Self {
        let u = UartState::default();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            rx_fifo: Vec::new(),
            pending_input: Vec::new(),
        }
    }
}

type Uart = Serial<SerialIrq, NoEvents, SerialOut>;

pub struct SerialDevice {
    uart: Uart,
    pending: VecDeque<u8>,
    irq: IrqLine,
    /// Shared with the UART's [`SerialIrq`].
    irq_muted: Arc<AtomicBool>,
    out: SerialOut,
    /// Output bytes the host writer refused.
    pub tx_errors: u64,
    /// Input bytes dropped because the host-side buffer was full.
    pub input_dropped: u64,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: SerialOut) -> SerialDevice {
        let irq_muted = Arc::new(AtomicBool::new(false));
        SerialDevice {
            uart: Serial::new(Self::uart_irq(&irq, &irq_muted), out.clone()),
            pending: VecDeque::new(),
            irq,
            irq_muted,
            out,
            tx_errors: 0,
            input_dropped: 0,
        }
    }

    fn uart_irq(irq: &IrqLine, muted: &Arc<AtomicBool>) -> SerialIrq {
        SerialIrq {
            line: irq.clone(),
            muted: muted.clone(),
        }
    }

    fn dlab(&mut self) -> bool {
        self.uart.read(LCR) & LCR_DLAB != 0
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        let receiving = offset == DATA && !self.dlab();
        let v = self.uart.read(offset);
        if receiving {
            self.feed();
        }
        v
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if self.uart.write(offset, value).is_err() {
            self.tx_errors += 1;
        }
    }

    /// Queues host input for the guest.
    pub fn input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT - self.pending.len();
        let take = bytes.len().min(room);
        self.pending.extend(&bytes[..take]);
        self.input_dropped += (bytes.len() - take) as u64;
        self.feed();
    }

    /// Moves pending input into the FIFO as far as it has room.
    fn feed(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let n = self
                .uart
                .enqueue_raw_bytes(self.pending.make_contiguous())
                .unwrap_or_default();
            if n == 0 {
                // Loopback mode ignores host input; keep it for later.
                break;
            }
            self.pending.drain(..n);
        }
    }

    pub fn state(&self) -> SerialState {
        let u = self.uart.state();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            rx_fifo: u.in_buffer,
            pending_input: self.pending.iter().copied().collect(),
        }
    }

    pub fn restore(&mut self, s: &SerialState) -> Result<(), RestoreError> {
        s.validate().map_err(RestoreError::Invalid)?;
        let u = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        };
        // vm-superio's `from_state` raises the interrupt again when one is pending. The saved
        // IOAPIC (pending edges) and vCPUs (local APIC) already hold that edge: a second one
        // would be an interrupt the guest never had, so it is not sent.
        self.irq_muted.store(true, Ordering::Relaxed);
        let uart = Serial::from_state(
            &u,
            Self::uart_irq(&self.irq, &self.irq_muted),
            NoEvents,
            self.out.clone(),
        );
        self.irq_muted.store(false, Ordering::Relaxed);
        self.uart = uart.map_err(RestoreError::Rejected)?;
        self.pending = s.pending_input.iter().copied().collect();
        Ok(())
    }
}
