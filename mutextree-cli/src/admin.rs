//! `mutextree release --force`: the administrator's way out of a lock
//! whose holder is gone but whose ttl is long.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use mutextree::backend::LockKind;
use mutextree::{Error, Grant, HeldLock, LockBackend, LockPath};
use tokio::time::Instant;

use crate::show::{describe, shown};
use crate::{exit, parse_path};

/// Release someone else's lock on PATH (and, with --recursive, every lock
/// under it), after confirmation.
///
/// Each lock is released only if it is still the one listed (same owner,
/// same fencing token): a lock granted again in between is left alone.
/// Its holder finds out at its next refresh or release (NotHeld); the
/// fencing token is what keeps it from doing harm meanwhile.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 release --force eu-west/rack-12
  mutextree release --force --recursive --yes eu-west")]
pub(crate) struct Release {
    /// The path whose lock to release.
    #[arg(value_parser = parse_path)]
    path: LockPath,

    /// Required: this releases locks held by others.
    #[arg(long, required = true)]
    force: bool,

    /// Also release every lock under PATH.
    #[arg(long)]
    recursive: bool,

    /// Do not ask for confirmation.
    #[arg(long, short)]
    yes: bool,
}

impl Release {
    pub(crate) async fn execute(self, store: &Arc<dyn LockBackend>) -> Result<ExitCode, Error> {
        let listed = store.list(Some(&self.path)).await?;
        let (targets, below): (Vec<HeldLock>, Vec<HeldLock>) =
            listed.into_iter().partition(|lock| self.recursive || lock.path == self.path);
        if targets.is_empty() {
            if below.is_empty() {
                println!("no lock is held at or under {}", shown(&self.path));
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "mutextree: no lock on {} itself, {} under it: add --recursive to release those",
                shown(&self.path),
                below.len()
            );
            return Ok(ExitCode::from(exit::FAILED));
        }
        for lock in &targets {
            println!("{}: {}", shown(&lock.path), describe(lock));
        }
        if !self.yes && !confirm(targets.len())? {
            eprintln!("mutextree: nothing released");
            return Ok(ExitCode::from(exit::FAILED));
        }
        let mut failed = false;
        for lock in &targets {
            match store.release(&as_grant(lock)).await {
                Ok(()) => println!("released {} (owner {}, token {})", shown(&lock.path), lock.owner, lock.token),
                Err(Error::NotHeld { .. }) => println!("{} was already released or expired", shown(&lock.path)),
                Err(error) => {
                    eprintln!("mutextree: releasing {}: {error}", shown(&lock.path));
                    failed = true;
                }
            }
        }
        Ok(if failed { ExitCode::from(exit::FAILED) } else { ExitCode::SUCCESS })
    }
}

/// A listed lock as the grant its holder has: what a store's release
/// matches (path, owner, token).
fn as_grant(lock: &HeldLock) -> Grant {
    Grant {
        path: lock.path.clone(),
        owner: lock.owner.clone(),
        token: lock.token,
        ttl: lock.remaining,
        expires_at: Instant::now() + lock.remaining,
        kind: if lock.transient { LockKind::Transient } else { LockKind::Lock },
    }
}

/// Asks on the terminal; without one, confirmation must come from --yes.
fn confirm(count: usize) -> Result<bool, Error> {
    let usage = |reason: String| Error::InvalidConfig { store: "mutextree", reason };
    if !std::io::stdin().is_terminal() {
        return Err(usage("no terminal to confirm on: pass --yes to release without asking".to_owned()));
    }
    eprint!("release {count} lock{} held by others? [y/N] ", if count == 1 { "" } else { "s" });
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|e| usage(format!("reading the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
