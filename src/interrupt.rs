//! Ctrl-C and SIGTERM: the first one asks every running stage to stop cleanly (a
//! training stage writes a checkpoint, a command stage kills its process group); a
//! second one exits at once. Nothing half-written is ever published, so both are safe.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The error of work that stopped because a [`CancelFlag`] was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// A shared "please stop" flag, set by signals or by tests.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A flag that nothing has set yet.
    pub fn new() -> CancelFlag {
        CancelFlag::default()
    }

    /// Asks everything watching this flag to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Also sets this flag on `signal` (Slurm's SIGUSR1 before a job's time limit).
    pub fn cancel_on(&self, signal: i32) -> std::io::Result<()> {
        signal_hook::flag::register(signal, Arc::clone(&self.0)).map(|_| ())
    }

    /// Sets this flag on SIGINT, SIGTERM and SIGHUP; a second signal terminates the
    /// process.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        // SIGHUP (the terminal closed, ssh dropped) stops a run like Ctrl-C: commands
        // run in their own process groups and would never hear of it.
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            // Registered first so that it only fires when the flag is already set.
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&self.0))?;
            signal_hook::flag::register(signal, Arc::clone(&self.0))?;
        }
        Ok(())
    }
}
