//! Exit statuses: distinct for each outcome a script may want to act on.
//!
//! | status | meaning |
//! | ---: | --- |
//! | 0 | done (`run`: the command's own status, whatever it is) |
//! | 1 | the store failed (unreachable, timed out) or something else went wrong |
//! | 2 | bad usage or input (an invalid path, ttl, URL, option; paths and modes that cannot be held together; a request the store cannot grant, such as a shared lock through the stepwise algorithm) |
//! | 3 | refused: an overlapping lock is held (`run --no-wait`; `why`: the path is blocked) |
//! | 4 | timed out waiting for an overlapping lock (`run --timeout`) |
//! | 5 | the lock was lost while the command ran; the command was stopped |
//! | 126 | the command could not be run (not executable) |
//! | 127 | the command was not found |
//! | 128+N | the command was killed by signal N |
//!
//! `run -E N` (`--conflict-exit-code`, as flock's) makes a refusal and a
//! timeout exit N instead of 3 and 4, for commands whose own statuses
//! would be confused with them.

use std::process::ExitCode;

use mutextree::Error;

/// The table above, for `--help`.
pub(crate) const HELP: &str = "Exit status:
  0      done (run: the command's own status)
  1      the store failed, or something else went wrong
  2      bad usage or input (paths and modes that cannot be held
         together, or that the store cannot grant, included)
  3      refused: an overlapping lock is held (run --no-wait; why: the path
         is blocked)
  4      timed out waiting for an overlapping lock (run --timeout)
  5      the lock was lost while the command ran; the command was stopped
  126    the command could not be run
  127    the command was not found
  128+N  the command was killed by signal N
run -E N (--conflict-exit-code) exits N instead of 3 and 4.";

pub(crate) const FAILED: u8 = 1;
pub(crate) const USAGE: u8 = 2;
pub(crate) const REFUSED: u8 = 3;
pub(crate) const TIMED_OUT: u8 = 4;
pub(crate) const LOST: u8 = 5;
pub(crate) const NOT_EXECUTABLE: u8 = 126;
pub(crate) const NOT_FOUND: u8 = 127;

/// The status for an error that ends the program.
pub(crate) fn for_error(error: &Error) -> ExitCode {
    ExitCode::from(status_for(error))
}

/// [`for_error`]'s status as a number.
pub(crate) fn status_for(error: &Error) -> u8 {
    match error {
        Error::Refused { .. } => REFUSED,
        Error::Timeout { .. } => TIMED_OUT,
        Error::Lost { .. } => LOST,
        Error::InvalidPath { .. }
        | Error::InvalidTtl { .. }
        | Error::InvalidOwner { .. }
        | Error::InvalidNamespace { .. }
        | Error::InvalidConfig { .. }
        | Error::InvalidRequest { .. }
        | Error::Unsupported { .. } => USAGE,
        _ => FAILED,
    }
}
