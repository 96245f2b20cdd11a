//! `mutextree release --force`: the administrator's way out of a lock
//! whose holder is gone but whose ttl is long, or whose holder must stop
//! now (the store announces the forced release, and the holder hears it).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use mutextree::backend::LockKind;
use mutextree::{Error, Grant, HeldLock, LockBackend, LockItems, LockPath};
use tokio::time::Instant;

use crate::show::{by_grant, holder, listed_items, plural, shown};
use crate::{exit, parse_path};

/// Release someone else's lock on PATH (and, with --recursive, every lock
/// under it), after confirmation.
///
/// A lock granted on several paths at once is released on all of them,
/// those outside PATH included: its holder asked for them together, and
/// keeps or loses them together.
///
/// Each lock is released only if it is still the one listed (same owner,
/// same fencing token): a lock granted again in between is left alone.
/// Its holder hears of it at once (the store announces it: a `mutextree
/// run` holding it stops its command), or, if it was not listening, finds
/// out at its next refresh or release; the fencing token is what keeps it
/// from doing harm meanwhile.
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
        // The whole namespace: a grant's other paths may be anywhere.
        let listed = store.list(None).await?;
        let (targets, below) = self.targets(&listed);
        if targets.is_empty() {
            if below == 0 {
                println!("no lock is held at or under {}", shown(&self.path));
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "mutextree: no lock on {} itself, {below} under it: add --recursive to release those",
                shown(&self.path)
            );
            return Ok(ExitCode::from(exit::FAILED));
        }
        for grant in &targets {
            println!("{}: held {}", listed_items(grant), holder(grant[0]));
        }
        if !self.yes && !confirm(&targets)? {
            eprintln!("mutextree: nothing released");
            return Ok(ExitCode::from(exit::FAILED));
        }
        let mut failed = false;
        for grant in &targets {
            let (items, owner, token) = (listed_items(grant), &grant[0].owner, grant[0].token);
            match store.revoke(&as_grant(grant)?).await {
                Ok(()) => println!("released {items} (owner {owner}, token {token})"),
                Err(Error::NotHeld { .. }) => println!("{items} was already released or expired"),
                Err(error) => {
                    eprintln!("mutextree: releasing {items}: {error}");
                    failed = true;
                }
            }
        }
        Ok(if failed { ExitCode::from(exit::FAILED) } else { ExitCode::SUCCESS })
    }

    /// The grants to release, each with all its listed paths, and how many
    /// locks under PATH are left out (without --recursive).
    fn targets<'a>(&self, listed: &'a [HeldLock]) -> (Vec<Vec<&'a HeldLock>>, usize) {
        let at_or_under = |lock: &HeldLock| lock.path == self.path || self.path.is_ancestor_of(&lock.path);
        let targeted = |lock: &&HeldLock| lock.path == self.path || (self.recursive && at_or_under(lock));
        let (targets, others): (Vec<_>, Vec<_>) =
            by_grant(listed).into_iter().partition(|grant| grant.iter().any(targeted));
        let below = others.iter().flatten().filter(|lock| at_or_under(lock)).count();
        (targets, below)
    }
}

/// A listed grant (every listed path of one token and owner) as the grant
/// its holder has: what a store's release matches (paths, owner, token).
fn as_grant(locks: &[&HeldLock]) -> Result<Grant, Error> {
    let first = locks[0];
    let items = LockItems::new(locks.iter().map(|lock| (lock.path.clone(), lock.mode)))?;
    Ok(Grant {
        items,
        owner: first.owner.clone(),
        token: first.token,
        ttl: first.remaining,
        expires_at: Instant::now() + first.remaining,
        kind: if first.transient { LockKind::Transient } else { LockKind::Lock },
    })
}

/// Asks on the terminal; without one, confirmation must come from --yes.
fn confirm(grants: &[Vec<&HeldLock>]) -> Result<bool, Error> {
    let usage = |reason: String| Error::InvalidConfig { store: "mutextree", reason };
    if !std::io::stdin().is_terminal() {
        return Err(usage("no terminal to confirm on: pass --yes to release without asking".to_owned()));
    }
    let paths: usize = grants.iter().map(Vec::len).sum();
    let several = if paths > grants.len() { format!(" ({})", plural(paths, "path")) } else { String::new() };
    eprint!("release {}{several} held by others? [y/N] ", plural(grants.len(), "lock"));
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|e| usage(format!("reading the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use mutextree::Mode;

    use super::*;
    use crate::show::tests::held_by as held;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        release: Release,
    }

    fn release(words: &[&str]) -> Release {
        Command::try_parse_from(["release"].iter().chain(words)).expect("valid").release
    }

    /// Key order, as stores list: a grant of two paths (one outside R), a
    /// lock on R itself, one under R, and one elsewhere.
    fn listed() -> Vec<HeldLock> {
        vec![
            held("R", Mode::Shared, "reader", 5),
            held("R/a", Mode::Exclusive, "mover", 7),
            held("R/b/c", Mode::Exclusive, "patcher", 8),
            held("S/x", Mode::Exclusive, "mover", 7),
            held("T", Mode::Exclusive, "other", 9),
        ]
    }

    #[test]
    fn a_grant_of_several_paths_is_released_on_all_of_them() {
        let listed = listed();
        let (targets, below) = release(&["--force", "R/a"]).targets(&listed);
        assert_eq!(targets.len(), 1);
        assert_eq!(listed_items(&targets[0]), "R/a, S/x", "the path outside R/a goes too");
        assert_eq!(below, 0);
        let grant = as_grant(&targets[0]).expect("a grant's items are valid together");
        assert_eq!(grant.items.len(), 2);
        assert_eq!((grant.owner.as_str(), grant.token), ("mover", 7));

        let (targets, below) = release(&["--force", "--recursive", "R"]).targets(&listed);
        let released: Vec<String> = targets.iter().map(|grant| listed_items(grant)).collect();
        assert_eq!(released, ["R (shared)", "R/a, S/x", "R/b/c"]);
        assert_eq!(below, 0);
    }

    #[test]
    fn without_recursive_only_the_path_itself_is_released() {
        let listed = listed();
        let (targets, below) = release(&["--force", "R"]).targets(&listed);
        let released: Vec<String> = targets.iter().map(|grant| listed_items(grant)).collect();
        assert_eq!(released, ["R (shared)"]);
        assert_eq!(below, 2, "R/a and R/b/c are left");
        let (targets, below) = release(&["--force", "R/b"]).targets(&listed);
        assert!(targets.is_empty());
        assert_eq!(below, 1);
    }
}
