//! `mutextree run`: a lock held for exactly as long as a command runs.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use futures::FutureExt;
use mutextree::backend::human;
use mutextree::{Error, LockItems, LockPath, Mode, TreeLock, TreeLockBuilder, Wait};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpgrp, tcgetpgrp, Pid};
use tokio::signal::unix::SignalKind;
use tokio::time::Instant;

use crate::show::shown_items;
use crate::waiting::WaitingLine;
use crate::{exit, parse_duration, parse_path};

/// How long a `run` stopped by a signal while it waited gives the attempt
/// it had in flight to answer, and a grant it brings to be released: a
/// request's own timeout, at most.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// How long the command waits for the store's channel of forced releases.
const REVOCATIONS_WITHIN: Duration = Duration::from_secs(2);

/// Hold the lock on PATH while COMMAND runs: on several paths, each
/// exclusive or shared, all or nothing.
///
/// Acquires the lock, waiting as long as it takes for an overlapping one
/// (as flock(1), `etcdctl lock` and `consul lock` do; --no-wait or
/// --timeout to wait less), runs COMMAND, keeps the lock refreshed while it
/// runs, releases it when it ends and exits with its status. A refused or
/// timed-out acquisition exits 3 or 4 (or --conflict-exit-code) and names
/// every lock in the way. While it waits with a terminal on stderr, one
/// line shows the lock in the way, how long that lock has left and how
/// long the wait has left; --verbose says on stderr, with or without a
/// terminal, each lock it waits behind.
///
/// Modes, as flock's -s and -x: PATH (or -x PATH) is locked exclusively,
/// refused while anyone holds the node, an ancestor or a descendant.
/// -s PATH locks it shared: any number of shared locks on one branch hold
/// at once, and keep every exclusive lock off the node, its ancestors and
/// its whole subtree.
///
/// Several paths (PATH..., -s PATH and -x PATH, each repeatable; up to 16)
/// are granted together or not at all, with one fencing token and one ttl,
/// and released together; nothing is held while waiting, so two runs
/// naming the same paths in any order cannot deadlock. Paths on one branch
/// with the same mode collapse to the ancestor; with different modes (A
/// and -s A/B) they are bad usage (exit 2), refused before the store is
/// contacted.
///
/// COMMAND runs in mutextree's own process group, as it would from the
/// shell: a terminal's Ctrl-C, Ctrl-Z and hangup reach both. SIGTERM,
/// SIGHUP, and SIGINT or SIGQUIT not sent by a terminal, are passed on to
/// it. It finds the lock in MUTEXTREE_TOKEN (the fencing token to hand to
/// what it changes), MUTEXTREE_OWNER, MUTEXTREE_PATH and MUTEXTREE_MODE
/// (the first path in key order and its mode: the only ones of a
/// single-path run) and MUTEXTREE_ITEMS (every path and its mode, a JSON
/// array of {"path", "mode"} objects).
///
/// If the lock is lost while it runs (released by `mutextree release
/// --force`, a refresh refused, or the store unreachable until the ttl ran
/// out), or turns out at the end to have been lost, mutextree says why,
/// stops COMMAND (SIGTERM, then SIGKILL after --kill-after) and exits 5. A
/// forced release is heard at once (the store announces it), not at the
/// next refresh, a third of the ttl later. Processes COMMAND started in the background
/// are not followed. If mutextree itself is killed with SIGKILL, COMMAND
/// goes on unprotected and the lock expires at its ttl.
///
/// Durations are written 30s, 500ms, 2m, 1h 30m, or as a bare number of
/// seconds (90, 0.5).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 run eu-west/rack-12 -- ./patch-rack.sh rack-12
  mutextree run -n eu-west/rack-12 -c 'echo token $MUTEXTREE_TOKEN; ./migrate.sh'
  mutextree run -w 10m -E 75 --ttl 2m eu-west -- ./migrate.sh
  mutextree run -s tenants/t1 -- ./export-config.sh t1
  mutextree run dc/rack-1/host-3 dc/rack-4/host-8 -- ./move-vm.sh vm-42
  mutextree run tenants/t1/project-9 -s tenants/t1/config -- ./rebuild.sh")]
pub(crate) struct Run {
    /// The paths to lock exclusively, e.g. eu-west/rack-12.
    #[arg(value_name = "PATH", value_parser = parse_path, required_unless_present_any = ["shared", "exclusive"])]
    paths: Vec<LockPath>,

    /// Lock PATH shared, in the same grant (repeatable).
    #[arg(short = 's', long, value_name = "PATH", value_parser = parse_path)]
    shared: Vec<LockPath>,

    /// Lock PATH exclusively, in the same grant (repeatable): as a PATH
    /// argument, written where it reads better.
    #[arg(short = 'x', long, value_name = "PATH", value_parser = parse_path)]
    exclusive: Vec<LockPath>,

    /// Fail at once if an overlapping lock is held, instead of waiting.
    #[arg(short = 'n', long, conflicts_with = "timeout")]
    no_wait: bool,

    /// Wait at most this long for an overlapping lock (0: not at all);
    /// without it, wait as long as it takes.
    #[arg(short = 'w', long, value_name = "DURATION", value_parser = parse_wait)]
    timeout: Option<Wait>,

    /// The exit status of a refused or timed-out acquisition, instead of 3
    /// and 4: one that COMMAND's own statuses cannot be taken for.
    #[arg(short = 'E', long, value_name = "N")]
    conflict_exit_code: Option<u8>,

    /// How long the lock lives unless refreshed; it is refreshed while the
    /// command runs, so this is how long it outlives a mutextree that
    /// died.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,

    /// The owner id to lock as (default: HOSTNAME:PID:RANDOM).
    #[arg(long)]
    owner: Option<String>,

    /// After the lock is lost: how long the command has between SIGTERM
    /// and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    kill_after: Duration,

    /// Whether to say on stderr each lock it waits behind, then how long
    /// the lock took and its fencing token: the global `-v`.
    #[arg(skip)]
    pub(crate) verbose: bool,

    /// Run this shell command with `sh -c` instead of COMMAND.
    #[arg(short = 'c', long = "command", value_name = "SHELL_COMMAND", conflicts_with = "command")]
    shell: Option<String>,

    /// The command and its arguments, after "--".
    #[arg(last = true, value_name = "COMMAND", required_unless_present = "shell")]
    command: Vec<OsString>,
}

impl Run {
    /// The paths with their modes, normalised and checked as one request.
    fn items(&self) -> Result<LockItems, Error> {
        let exclusive = self.paths.iter().chain(&self.exclusive).map(|path| (path.clone(), Mode::Exclusive));
        LockItems::new(exclusive.chain(self.shared.iter().map(|path| (path.clone(), Mode::Shared))))
    }

    pub(crate) async fn execute(self, place: &crate::Place) -> Result<ExitCode, Error> {
        // Listening before anything is held: a signal from now on ends the
        // run properly (nothing held, or the command stopped and the lock
        // released), never by the default action that would leave the
        // command running unprotected.
        let mut signals = Signals::new();
        // Bad paths and modes are refused before the store is contacted.
        let items = self.items()?;
        let shown = shown_items(&items);
        let store = place.connect().await?;
        let wait = if self.no_wait { Wait::No } else { self.timeout.unwrap_or(Wait::Forever) };
        let mut waiting = WaitingLine::start(&items, wait, self.verbose);
        let mut lock =
            TreeLockBuilder::<TreeLock>::many(store.clone(), items.iter().map(|item| (&item.path, item.mode)))
                .ttl(self.ttl)
                .wait(wait)
                .auto_refresh(true)
                .on_wait(waiting.observer());
        if let Some(owner) = &self.owner {
            lock = lock.owner(owner);
        }
        let lock = lock.build()?;
        waiting.watch_queue(store, lock.owner().clone(), items.clone());
        let started = Instant::now();
        let acquired = tokio::select! {
            acquired = lock.acquire() => acquired,
            signal = signals.next() => {
                waiting.clear();
                // An attempt in flight finishes in the background, and a
                // grant it brings is released there: let that work end
                // before the process does, or the lock stays until its ttl.
                let _ = tokio::time::timeout(SETTLE_LIMIT, lock.settled()).await;
                return Ok(ExitCode::from(signal_status(signal as i32)));
            }
        };
        waiting.clear();
        let grant = match acquired {
            Ok(grant) => grant,
            Err(error @ (Error::Refused { .. } | Error::Timeout { .. })) => {
                let hint = if self.no_wait {
                    "use --timeout DURATION or drop --no-wait to wait"
                } else if matches!(error, Error::Refused { .. }) {
                    "use a --timeout longer than 0 to wait"
                } else {
                    "use a longer --timeout, or none to wait as long as it takes"
                };
                eprintln!("mutextree: {error} ({hint})");
                return Ok(ExitCode::from(self.conflict_exit_code.unwrap_or_else(|| exit::status_for(&error))));
            }
            Err(error) => return Err(error),
        };
        if self.verbose {
            eprintln!("mutextree: {shown} granted after {}, token {}", human(started.elapsed()), grant.token);
        }
        let (program, arguments) = match &self.shell {
            Some(shell) => (OsString::from("sh"), vec![OsString::from("-c"), OsString::from(shell)]),
            None => (self.command[0].clone(), self.command[1..].to_vec()),
        };
        let lost = lock.lost();
        // `lost` listens for a forced release from now on; once the store's
        // channel is up (it is opened now, for the first holder), one is
        // heard at once, so the command starts only then (or after a short
        // while without it: it is then heard at the next refresh).
        let mut revocation = lock.backend().listen_revocation(&grant);
        let _ = tokio::time::timeout(REVOCATIONS_WITHIN, revocation.ready()).await;
        let name = program.to_string_lossy().into_owned();
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&arguments)
            .env("MUTEXTREE_PATH", grant.path().to_string())
            .env("MUTEXTREE_MODE", grant.items.first().mode.as_str())
            .env("MUTEXTREE_ITEMS", items_json(&grant.items).to_string())
            .env("MUTEXTREE_OWNER", grant.owner.as_str())
            .env("MUTEXTREE_TOKEN", grant.token.to_string());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                release(&lock).await;
                eprintln!("mutextree: cannot run {name}: {error}");
                let status =
                    if error.kind() == std::io::ErrorKind::NotFound { exit::NOT_FOUND } else { exit::NOT_EXECUTABLE };
                return Ok(ExitCode::from(status));
            }
        };
        let pid = Pid::from_raw(
            child.id().and_then(|id| i32::try_from(id).ok()).expect("a child that was just spawned has a pid"),
        );
        tokio::pin!(lost);
        let status = loop {
            tokio::select! {
                // The command's end first: when it ended and the lock was
                // lost at once, the check below still sees the loss.
                biased;
                status = child.wait() => break status,
                signal = signals.next() => {
                    if !signals.came_from_the_terminal(signal) {
                        let _ = kill(pid, signal);
                    }
                }
                error = &mut lost => {
                    eprintln!("mutextree: {error}; stopping {name}");
                    let _ = kill(pid, Signal::SIGTERM);
                    if tokio::time::timeout(self.kill_after, child.wait()).await.is_err() {
                        eprintln!("mutextree: {name} did not end within {:?} of SIGTERM; killing it", self.kill_after);
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = child.wait().await;
                    }
                    return Ok(ExitCode::from(exit::LOST));
                }
            }
        };
        // The lock may have been lost while the command ended, or since the
        // keeper last refreshed it: then the command ran unprotected, and
        // its success is not ours to report.
        let lost_meanwhile = lost.as_mut().now_or_never();
        let released = lock.release().await;
        match (lost_meanwhile, released) {
            (Some(error), _) => {
                eprintln!("mutextree: {error}, before {name} ended");
                return Ok(ExitCode::from(exit::LOST));
            }
            (None, Err(Error::NotHeld { .. })) => {
                eprintln!(
                    "mutextree: the lock on {shown} was lost before {name} ended: it expired or was released by \
                     someone else"
                );
                return Ok(ExitCode::from(exit::LOST));
            }
            (None, Err(error)) => eprintln!("mutextree: releasing {shown}: {error}"),
            (None, Ok(())) => {}
        }
        Ok(match status {
            Ok(status) => ExitCode::from(status_code(status)),
            Err(error) => {
                eprintln!("mutextree: waiting for {name}: {error}");
                ExitCode::from(exit::FAILED)
            }
        })
    }
}

/// `[{"path": "A/B", "mode": "shared"}, ...]`: the items for the command's
/// environment, in a form every script language reads without ambiguity
/// (a segment may hold any character, a newline or a comma included).
fn items_json(items: &LockItems) -> serde_json::Value {
    items.iter().map(|item| serde_json::json!({"path": item.path.to_string(), "mode": item.mode.as_str()})).collect()
}

/// The signals `run` passes on to the command.
struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Self {
        let streams = [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
            (Signal::SIGQUIT, SignalKind::quit()),
        ]
        .into_iter()
        .map(|(signal, kind)| (signal, tokio::signal::unix::signal(kind).expect("a signal handler can be installed")))
        .collect();
        Signals { streams }
    }

    /// The next signal received.
    async fn next(&mut self) -> Signal {
        let waits = self.streams.iter_mut().map(|(signal, stream)| {
            let signal = *signal;
            Box::pin(async move {
                stream.recv().await;
                signal
            })
        });
        futures::future::select_all(waits).await.0
    }

    /// Whether a terminal sent `signal` to its foreground group (ours,
    /// the command's too): then the command has it already.
    fn came_from_the_terminal(&self, signal: Signal) -> bool {
        matches!(signal, Signal::SIGINT | Signal::SIGQUIT)
            && tcgetpgrp(std::io::stdin()).is_ok_and(|foreground| foreground == getpgrp())
    }
}

/// Releases, saying so on stderr if that failed: the command's status
/// stays the exit status (the lock then expires at its ttl).
async fn release(lock: &TreeLock) {
    if let Err(error) = lock.release().await {
        eprintln!("mutextree: releasing {}: {error}", shown_items(lock.items()));
    }
}

/// A command's exit status as ours: its code, or 128 + the signal that
/// killed it (as shells report it).
fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(exit::FAILED),
        (None, Some(signal)) => signal_status(signal),
        (None, None) => exit::FAILED,
    }
}

/// 128 + the signal, as shells report a process a signal ended.
fn signal_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(exit::FAILED)
}

/// `0` (no waiting), a duration, or `forever`.
fn parse_wait(text: &str) -> Result<Wait, String> {
    match text {
        "forever" => Ok(Wait::Forever),
        _ => parse_duration(text).map(|wait| if wait.is_zero() { Wait::No } else { Wait::For(wait) }),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        run: Run,
    }

    fn items(words: &[&str]) -> Result<LockItems, Error> {
        let words = ["run"].iter().chain(words).chain(&["--", "true"]);
        Command::try_parse_from(words).expect("a valid command line").run.items()
    }

    #[test]
    fn paths_take_their_modes_from_their_flags() {
        let one = items(&["eu/rack-12"]).expect("valid");
        assert!(one.is_single_exclusive());
        assert_eq!(items(&["-s", "eu"]).expect("valid").to_string(), "eu (shared)");
        let mixed = items(&["A/B", "--shared", "C/D", "-x", "E", "-s", "F", "G"]).expect("valid");
        assert_eq!(mixed.to_string(), "A/B, C/D (shared), E, F (shared), G");
        assert_eq!(items_json(&mixed)[1], serde_json::json!({"path": "C/D", "mode": "shared"}));
        // Normalised as one request: an ancestor of the same mode covers
        // its descendants.
        assert_eq!(items(&["-s", "A", "-s", "A/B"]).expect("valid").to_string(), "A (shared)");
    }

    #[test]
    fn paths_that_cannot_be_held_together_are_bad_usage() {
        let branch = items(&["A", "-s", "A/B"]).expect_err("one branch, two modes");
        assert!(matches!(branch, Error::InvalidRequest { .. }), "{branch:?}");
        assert!(branch.to_string().contains("A/B (shared)"), "{branch}");
        assert_eq!(exit::status_for(&branch), exit::USAGE);
        let paths: Vec<String> = (0..17).map(|n| format!("host-{n}")).collect();
        let words: Vec<&str> = paths.iter().map(String::as_str).collect();
        let many = items(&words).expect_err("17 paths");
        assert!(many.to_string().contains("at most 16"), "{many}");
        assert_eq!(exit::status_for(&many), exit::USAGE);
        assert!(items(&words[..16]).is_ok(), "16 is the limit");
    }

    #[test]
    fn a_path_is_needed() {
        assert!(Command::try_parse_from(["run", "--", "true"]).is_err());
        assert!(Command::try_parse_from(["run", "-x", "A", "--", "true"]).is_ok());
    }

    #[test]
    fn waits() {
        assert_eq!(parse_wait("0s"), Ok(Wait::No));
        assert_eq!(parse_wait("0"), Ok(Wait::No));
        assert_eq!(parse_wait("forever"), Ok(Wait::Forever));
        assert_eq!(parse_wait("2m"), Ok(Wait::For(Duration::from_secs(120))));
        assert!(parse_wait("soon").is_err());
    }
}
