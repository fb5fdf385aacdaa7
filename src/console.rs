//! Console lines that never panic. `eprintln!` panics when stderr is gone (`trainyard
//! run … 2>&1 | head`); a run must finish its work and record it all the same, so the
//! run path writes through [`line`], which drops what cannot be written.

use std::io::Write;

/// Writes `text` and a newline to stderr in one write (`eprintln!` writes each piece of
/// the format on its own: tens of thousands of system calls in a no-op run of a big
/// pipeline), ignoring errors.
pub fn line(text: std::fmt::Arguments<'_>) {
    let text = format!("{text}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Writes `text` to stderr, ignoring errors.
pub fn write(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
