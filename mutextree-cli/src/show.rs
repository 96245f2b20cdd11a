//! `mutextree status` and `mutextree why`: who holds what, who waits, and
//! what is in the way.
//!
//! A waiter of a fair store holds a *reservation*: its paths, its owner and
//! its ticket (its place in the queue). A reservation delays the requests
//! that conflict with it and come after it, a request that does not wait
//! included, so both commands show them beside the locks.
//!
//! Stores list one entry per item of a grant; the items of one grant share
//! its fencing token and owner, which is how they are shown together here
//! ([`by_grant`]), and how `release --force` finds every item of a grant.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mutextree::backend::human;
use mutextree::{Error, HeldLock, LockBackend, LockItems, LockPath, Mode};

use crate::{exit, parse_path};

/// Show the locks held at and under PATH (or in the whole namespace) as a
/// tree: mode, owner, remaining life and fencing token of each holder, then
/// the grants that hold several paths at once, one line each, then the
/// waiters in the queue, first in line first. With --watch, again every
/// second (on a terminal, redrawn in place) until interrupted.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 status
  mutextree status eu-west --watch
  mutextree status eu-west --json | jq '.[] | select(.mode == \"shared\") | .owner'
  mutextree status --json | jq 'group_by(.token) | map(select(length > 1))'")]
pub(crate) struct Status {
    /// Where to look (default: the whole namespace). A grant of several
    /// paths shows only its paths at or under PATH.
    #[arg(value_parser = parse_path)]
    path: Option<LockPath>,

    /// A JSON array instead of a tree, one object per locked or awaited
    /// path (path, segments, mode, owner, remaining_ms, token, transient,
    /// waiting); the paths of one grant share its token, those of one
    /// waiter its ticket (in `token`, with `waiting` true).
    #[arg(long)]
    json: bool,

    /// Show it again every second until interrupted (Ctrl-C): on a
    /// terminal the screen is redrawn in place; otherwise each showing
    /// follows the last (with --json, one array per line).
    #[arg(long)]
    watch: bool,
}

/// How often `status --watch` asks again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Clears a terminal and puts the cursor at its top left.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

impl Status {
    pub(crate) async fn execute(self, store: &Arc<dyn LockBackend>, namespace: &str) -> Result<ExitCode, Error> {
        if !self.watch {
            print!("{}", self.showing(store, namespace).await?);
            return Ok(ExitCode::SUCCESS);
        }
        let redraw = std::io::stdout().is_terminal();
        let mut every = tokio::time::interval(WATCH_EVERY);
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            tokio::select! {
                _ = &mut interrupted => return Ok(ExitCode::SUCCESS),
                _ = every.tick() => {}
            }
            let showing = self.showing(store, namespace).await?;
            if redraw {
                print!("{CLEAR_SCREEN}{showing}");
            } else {
                println!("{showing}");
            }
            // A screen is drawn whole, not line by line.
            let _ = std::io::stdout().flush();
        }
    }

    /// What `status` shows now, asking the store.
    async fn showing(&self, store: &Arc<dyn LockBackend>, namespace: &str) -> Result<String, Error> {
        let held = store.list(self.path.as_ref()).await?;
        let waiters = store.waiters(self.path.as_ref()).await?;
        let namespace = visible(namespace);
        if self.json {
            return Ok(format!("{}\n", json(held.iter().chain(&waiters))));
        }
        let mut out = String::new();
        if held.is_empty() {
            match &self.path {
                Some(path) => {
                    let _ = writeln!(out, "no locks held at or under {} in namespace {namespace}", shown(path));
                }
                None => {
                    let _ = writeln!(out, "no locks held in namespace {namespace}");
                }
            }
        } else {
            out.push_str(&tree(&namespace, self.path.as_ref(), &held));
            out.push_str(&several_paths(&held));
        }
        out.push_str(&queue(&waiters, SystemTime::now()));
        Ok(out)
    }
}

/// Say what would block a lock on PATH right now, and for how long: every
/// lock in the way, each shared holder included, and every waiter queued
/// for it; exit 3 if something does.
///
/// An exclusive lock (the default) is blocked by any lock on PATH, an
/// ancestor or a descendant; a shared one (--shared) only by the exclusive
/// ones among them. On a fair store the waiters that asked for such a lock
/// first come before it too.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 why eu-west/rack-12/host-7
  mutextree why --shared eu-west
  mutextree why eu-west/rack-12 --json | jq '.blockers[].owner'")]
pub(crate) struct Why {
    /// The path that would be locked.
    #[arg(value_parser = parse_path)]
    path: LockPath,

    /// Ask about a shared lock instead of an exclusive one.
    #[arg(short, long)]
    shared: bool,

    /// A JSON object instead of text: the path, the mode asked about,
    /// whether it is free, and the locks in the way (as `status --json`
    /// lists them, each with its relation to the path).
    #[arg(long)]
    json: bool,
}

impl Why {
    pub(crate) async fn execute(self, store: &Arc<dyn LockBackend>) -> Result<ExitCode, Error> {
        // Everything under the path's root holds its ancestors and its
        // subtree; the listing asks the store once.
        let root = LockPath::new([self.path.segments().next().unwrap_or_default()])?;
        let mode = if self.shared { Mode::Shared } else { Mode::Exclusive };
        let mut listed = store.list(Some(&root)).await?;
        listed.extend(store.waiters(Some(&root)).await?);
        let answer = WhyAnswer::new(&self.path, mode, listed);
        if self.json {
            println!("{}", answer.json());
        } else {
            print!("{}", answer.text());
        }
        Ok(if answer.blockers.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(exit::REFUSED) })
    }
}

/// What `why` found: the locks and the waiters in the way of a `mode` lock
/// on `path`, and the locks on its branch that are not (shared, for a
/// shared lock).
struct WhyAnswer<'a> {
    path: &'a LockPath,
    mode: Mode,
    blockers: Vec<HeldLock>,
    sharing: usize,
}

impl<'a> WhyAnswer<'a> {
    /// From a listing that holds at least every lock on `path`'s branch.
    fn new(path: &'a LockPath, mode: Mode, listed: Vec<HeldLock>) -> Self {
        let (blockers, sharing): (Vec<HeldLock>, Vec<HeldLock>) =
            listed.into_iter().filter(|lock| lock.path.overlaps(path)).partition(|lock| mode.conflicts_with(lock.mode));
        let sharing = sharing.iter().filter(|lock| !lock.waiting).count();
        WhyAnswer { path, mode, blockers, sharing }
    }

    fn text(&self) -> String {
        let (path, lock) = (shown(self.path), a_lock(self.mode));
        let mut out = if self.blockers.is_empty() {
            format!("{path} is free: {lock} on it would be granted now\n")
        } else {
            let waiters = self.blockers.iter().filter(|lock| lock.waiting).count();
            let locks = self.blockers.len() - waiters;
            let what = match (locks, waiters) {
                (_, 0) => plural(locks, "lock"),
                (0, _) => plural(waiters, "waiter") + " queued first",
                _ => format!("{} and {} queued first", plural(locks, "lock"), plural(waiters, "waiter")),
            };
            let mut out = format!("{lock} on {path} is blocked by {what}:\n");
            for lock in &self.blockers {
                let _ =
                    writeln!(out, "  {} ({}): {}", shown(&lock.path), relation(&lock.path, self.path), describe(lock));
            }
            out
        };
        if self.sharing > 0 {
            let _ = writeln!(out, "({} on its branch would not be in the way)", plural(self.sharing, "shared lock"));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let listed = self.blockers.iter().map(|lock| {
            let mut object = lock_json(lock);
            object["relation"] = relation(&lock.path, self.path).into();
            object
        });
        serde_json::json!({
            "path": self.path.to_string(),
            "mode": self.mode.as_str(),
            "free": self.blockers.is_empty(),
            "blockers": listed.collect::<Vec<_>>(),
        })
    }
}

/// `a shared lock`, `an exclusive lock`.
fn a_lock(mode: Mode) -> &'static str {
    match mode {
        Mode::Shared => "a shared lock",
        Mode::Exclusive => "an exclusive lock",
    }
}

/// What a lock on `held` is to `wanted`, which it overlaps: `the path
/// itself`, `an ancestor` or `a descendant`.
pub(crate) fn relation(held: &LockPath, wanted: &LockPath) -> &'static str {
    if held == wanted {
        "the path itself"
    } else if held.is_ancestor_of(wanted) {
        "an ancestor"
    } else {
        "a descendant"
    }
}

/// A lock that refused `items`, with where it is: `A (an ancestor)`, or
/// for a request of several paths, `A (an ancestor of A/B)`.
pub(crate) fn in_the_way(items: &LockItems, blocker: &HeldLock) -> String {
    let asked = &items.blocked_by(&blocker.path, blocker.mode).unwrap_or(items.first()).path;
    let relation = relation(&blocker.path, asked);
    if items.len() == 1 || blocker.path == *asked {
        format!("{} ({relation})", shown(&blocker.path))
    } else {
        format!("{} ({relation} of {})", shown(&blocker.path), shown(asked))
    }
}

/// A path as the command prints it: its text form (`\\/` for a slash in a
/// segment), with control characters shown as escapes, so that no name can
/// break the layout or drive the terminal.
pub(crate) fn shown(path: &LockPath) -> String {
    visible(&path.to_string())
}

fn visible(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// `held exclusively by OWNER for 12.3 s more, fencing token 17`, or
/// `held shared by ...`; for a waiter's reservation `awaited exclusively
/// by OWNER, queued with ticket 18`.
pub(crate) fn describe(lock: &HeldLock) -> String {
    let how = match lock.mode {
        Mode::Exclusive => "exclusively",
        Mode::Shared => "shared",
    };
    if lock.waiting {
        return format!("awaited {how} by {}, queued with ticket {}", lock.owner, lock.token);
    }
    format!("held {how} {}", holder(lock))
}

/// `by OWNER for 12.3 s more, fencing token 17`: who holds a lock, and
/// until when.
pub(crate) fn holder(lock: &HeldLock) -> String {
    let transient = if lock.transient { ", a stepwise client's passing parent lock" } else { "" };
    format!("by {} for {} more, fencing token {}{transient}", lock.owner, human(lock.remaining), lock.token)
}

/// `A/B (shared), C/D`: the paths of one grant or request with their
/// modes, as a request names them (exclusive is the default).
pub(crate) fn items_text<'a>(items: impl IntoIterator<Item = (&'a LockPath, Mode)>) -> String {
    let items: Vec<String> = items
        .into_iter()
        .map(|(path, mode)| match mode {
            Mode::Exclusive => shown(path),
            Mode::Shared => format!("{} (shared)", shown(path)),
        })
        .collect();
    items.join(", ")
}

/// [`items_text`] for a request or a grant.
pub(crate) fn shown_items(items: &LockItems) -> String {
    items_text(items.iter().map(|item| (&item.path, item.mode)))
}

/// [`items_text`] for the listed paths of one grant.
pub(crate) fn listed_items(locks: &[&HeldLock]) -> String {
    items_text(locks.iter().map(|lock| (&lock.path, lock.mode)))
}

/// The listed locks by grant (same fencing token and owner), in token
/// order; each grant's paths in the listing's (key) order.
pub(crate) fn by_grant(held: &[HeldLock]) -> Vec<Vec<&HeldLock>> {
    let mut grants: BTreeMap<(u64, &str), Vec<&HeldLock>> = BTreeMap::new();
    for lock in held {
        grants.entry((lock.token, lock.owner.as_str())).or_default().push(lock);
    }
    grants.into_values().collect()
}

/// `1 lock`, `3 locks`.
pub(crate) fn plural(count: usize, noun: &str) -> String {
    format!("{count} {noun}{}", if count == 1 { "" } else { "s" })
}

/// The locks as `tree(1)` draws directories: nodes by name under `root`
/// (or the namespace), each holder's details beside its node (shared
/// holders of one node side by side), below a line naming the namespace
/// (and the root).
fn tree(namespace: &str, root: Option<&LockPath>, held: &[HeldLock]) -> String {
    #[derive(Default)]
    struct Node<'a> {
        locks: Vec<&'a HeldLock>,
        children: BTreeMap<&'a str, Node<'a>>,
    }
    let paths_per_grant = by_grant(held).into_iter().flat_map(|grant| {
        let count = grant.len();
        grant.into_iter().map(move |lock| ((lock.token, lock.owner.as_str()), count))
    });
    let paths_per_grant: BTreeMap<(u64, &str), usize> = paths_per_grant.collect();
    let details = |lock: &HeldLock| {
        let several = paths_per_grant.get(&(lock.token, lock.owner.as_str())).copied().unwrap_or(1);
        let grant = if several > 1 { format!(", one grant of {several} paths") } else { String::new() };
        format!("  [{}{grant}]", describe(lock))
    };
    let skip = root.map_or(0, LockPath::depth);
    let mut top = Node::default();
    for lock in held {
        let mut node = &mut top;
        for segment in lock.path.segments().skip(skip) {
            node = node.children.entry(segment).or_default();
        }
        node.locks.push(lock);
    }
    fn draw(out: &mut String, node: &Node<'_>, prefix: &str, details: &dyn Fn(&HeldLock) -> String) {
        let count = node.children.len();
        for (index, (name, child)) in node.children.iter().enumerate() {
            let last = index + 1 == count;
            let name = LockPath::new([*name]).map_or_else(|_| visible(name), |one| shown(&one));
            let _ = write!(out, "{prefix}{}{name}", if last { "└── " } else { "├── " });
            for lock in &child.locks {
                out.push_str(&details(lock));
            }
            out.push('\n');
            draw(out, child, &format!("{prefix}{}", if last { "    " } else { "│   " }), details);
        }
    }
    let mut out = match root {
        Some(root) => format!("namespace {namespace}: {}", shown(root)),
        None => format!("namespace {namespace}"),
    };
    for lock in &top.locks {
        out.push_str(&details(lock));
    }
    out.push('\n');
    draw(&mut out, &top, "", &details);
    out
}

/// The grants that hold several of the listed paths, one line each:
/// `token 17 owner "web-1": A/B (shared), C/D`; nothing if there are none.
fn several_paths(held: &[HeldLock]) -> String {
    let mut out = String::new();
    for grant in by_grant(held).into_iter().filter(|grant| grant.len() > 1) {
        if out.is_empty() {
            out.push_str("grants of several paths:\n");
        }
        let _ = writeln!(out, "  token {} owner {}: {}", grant[0].token, grant[0].owner, listed_items(&grant));
    }
    out
}

/// The waiters, one line per waiter in ticket order (first in line first):
/// `ticket 18 owner "web-2" waiting since 09:14:03 UTC (4.2 s): A/B
/// (shared), C/D`, the time read on `now`'s clock; nothing if there are
/// none.
fn queue(waiters: &[HeldLock], now: SystemTime) -> String {
    let mut out = String::new();
    for waiter in by_grant(waiters) {
        if out.is_empty() {
            out.push_str("waiters, first in line first:\n");
        }
        let (first, waited) = (&waiter[0], waiter[0].waited);
        let since = clock_time(now.checked_sub(waited).unwrap_or(UNIX_EPOCH));
        let _ = writeln!(
            out,
            "  ticket {} owner {} waiting since {since} ({}): {}",
            first.token,
            first.owner,
            human(waited),
            listed_items(&waiter)
        );
    }
    out
}

/// `at` as a UTC time of day, `09:14:03 UTC`: enough to tell when a
/// waiter came (it waits seconds or minutes, not days).
fn clock_time(at: SystemTime) -> String {
    let seconds = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    format!("{:02}:{:02}:{:02} UTC", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

fn json<'a>(listed: impl IntoIterator<Item = &'a HeldLock>) -> serde_json::Value {
    listed.into_iter().map(lock_json).collect()
}

/// One lock as `status --json` lists it.
fn lock_json(lock: &HeldLock) -> serde_json::Value {
    serde_json::json!({
        "path": lock.path.to_string(),
        "segments": lock.path.segments().collect::<Vec<_>>(),
        "mode": lock.mode.as_str(),
        "owner": lock.owner.as_str(),
        "remaining_ms": u64::try_from(lock.remaining.as_millis()).unwrap_or(u64::MAX),
        "token": lock.token,
        "transient": lock.transient,
        "waiting": lock.waiting,
        "waited_ms": u64::try_from(lock.waited.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use mutextree::Owner;

    use super::*;

    fn held(path: &str, token: u64) -> HeldLock {
        held_by(path, Mode::Exclusive, "web-1", token)
    }

    /// A listed lock, 12.3 s from its expiry.
    pub(crate) fn held_by(path: &str, mode: Mode, owner: &str, token: u64) -> HeldLock {
        HeldLock {
            path: LockPath::parse(path).expect("path"),
            mode,
            owner: Owner::new(owner).expect("owner"),
            token,
            remaining: Duration::from_millis(12_300),
            transient: false,
            waiting: false,
            waited: Duration::ZERO,
        }
    }

    /// A listed reservation with `ticket`.
    /// A listed reservation with `ticket`, 2.5 s from its lapse, its
    /// waiter in line for `ticket` seconds.
    pub(crate) fn awaited_by(path: &str, mode: Mode, owner: &str, ticket: u64) -> HeldLock {
        HeldLock {
            waiting: true,
            remaining: Duration::from_millis(2_500),
            waited: Duration::from_secs(ticket),
            ..held_by(path, mode, owner, ticket)
        }
    }

    #[test]
    fn waiters_are_listed_in_ticket_order_with_their_paths_together() {
        let waiters = [
            awaited_by("dc/a", Mode::Exclusive, "mover", 12),
            awaited_by("dc/b", Mode::Shared, "mover", 12),
            awaited_by("dc", Mode::Exclusive, "failover", 9),
        ];
        // 10:00:00 UTC on some day.
        let now = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 10 * 3600);
        assert_eq!(
            queue(&waiters, now),
            "waiters, first in line first:\n  ticket 9 owner \"failover\" waiting since 09:59:51 UTC (9.0 s): dc\n  \
             ticket 12 owner \"mover\" waiting since 09:59:48 UTC (12.0 s): dc/a, dc/b (shared)\n"
        );
        assert_eq!(queue(&[], now), "");
        let value = json(waiters.iter());
        assert_eq!(value[2]["waiting"], true);
        assert_eq!(value[2]["token"], 9);
        assert_eq!(value[2]["waited_ms"], 9_000);
        assert_eq!(json([held("x", 1)].iter())[0]["waiting"], false);
    }

    #[test]
    fn why_names_the_waiters_queued_first() {
        let listed = vec![
            held_by("eu/rack-1/host-2", Mode::Exclusive, "patcher", 6),
            awaited_by("eu", Mode::Exclusive, "failover", 8),
            awaited_by("eu/rack-1", Mode::Shared, "audit", 9),
            awaited_by("eu/rack-2", Mode::Exclusive, "sibling", 10),
        ];
        let wanted = path("eu/rack-1/host-2");
        let answer = WhyAnswer::new(&wanted, Mode::Shared, listed.clone());
        let text = answer.text();
        assert!(
            text.starts_with("a shared lock on eu/rack-1/host-2 is blocked by 1 lock and 1 waiter queued first:\n"),
            "{text}"
        );
        assert!(
            text.contains("  eu (an ancestor): awaited exclusively by \"failover\", queued with ticket 8\n"),
            "{text}"
        );
        assert!(
            !text.contains("audit") && !text.contains("sibling") && !text.contains("would not be in the way"),
            "{text}"
        );
        assert_eq!(answer.json()["blockers"][1]["waiting"], true);

        let sibling = path("eu/rack-3");
        let waiters_only = WhyAnswer::new(&sibling, Mode::Exclusive, listed);
        assert!(waiters_only
            .text()
            .starts_with("an exclusive lock on eu/rack-3 is blocked by 1 waiter queued first:\n"));
    }

    fn path(text: &str) -> LockPath {
        LockPath::parse(text).expect("path")
    }

    #[test]
    fn a_tree_like_tree_draws_it() {
        let locks = [held("eu/rack-1", 3), held("eu/rack-2/host-1", 4), held("eu/rack-2/host-2", 5), held("us", 6)];
        let drawn = tree("app", None, &locks);
        let expected = "namespace app
├── eu
│   ├── rack-1  [held exclusively by \"web-1\" for 12.3 s more, fencing token 3]
│   └── rack-2
│       ├── host-1  [held exclusively by \"web-1\" for 12.3 s more, fencing token 4]
│       └── host-2  [held exclusively by \"web-1\" for 12.3 s more, fencing token 5]
└── us  [held exclusively by \"web-1\" for 12.3 s more, fencing token 6]
";
        assert_eq!(drawn, expected);
        let under = tree("app", Some(&path("eu/rack-2")), &locks[1..3]);
        assert!(under.starts_with("namespace app: eu/rack-2\n├── host-1"), "{under}");
        assert_eq!(several_paths(&locks), "", "no grant holds several paths");
    }

    #[test]
    fn shared_holders_of_one_node_stand_side_by_side() {
        let locks = [held_by("eu", Mode::Shared, "reader-1", 3), held_by("eu", Mode::Shared, "reader-2", 4)];
        let drawn = tree("app", None, &locks);
        let expected = "namespace app
└── eu  [held shared by \"reader-1\" for 12.3 s more, fencing token 3]  \
             [held shared by \"reader-2\" for 12.3 s more, fencing token 4]
";
        assert_eq!(drawn, expected);
    }

    #[test]
    fn the_paths_of_one_grant_are_shown_together() {
        // As a store lists them: key order, the grants' paths interleaved.
        let locks = [
            held_by("dc/rack-1/host-3", Mode::Exclusive, "mover", 17),
            held_by("dc/rack-2", Mode::Shared, "auditor", 18),
            held_by("dc/rack-4/host-8", Mode::Exclusive, "mover", 17),
            held_by("tenants/t1", Mode::Shared, "auditor", 18),
            held_by("tenants/t2", Mode::Exclusive, "admin", 19),
        ];
        assert_eq!(
            several_paths(&locks),
            "grants of several paths:
  token 17 owner \"mover\": dc/rack-1/host-3, dc/rack-4/host-8
  token 18 owner \"auditor\": dc/rack-2 (shared), tenants/t1 (shared)
"
        );
        let drawn = tree("app", None, &locks);
        assert!(
            drawn.contains(
                "host-3  [held exclusively by \"mover\" for 12.3 s more, fencing token 17, one grant of 2 paths]"
            ),
            "{drawn}"
        );
        assert!(drawn.contains("t2  [held exclusively by \"admin\" for 12.3 s more, fencing token 19]\n"), "{drawn}");
        // One token, two owners: two grants (a store's tokens are unique,
        // but the grouping does not rely on it).
        let two = [held_by("a", Mode::Shared, "x", 5), held_by("b", Mode::Shared, "y", 5)];
        assert_eq!(by_grant(&two).len(), 2);
    }

    #[test]
    fn names_cannot_break_the_tree() {
        let locks = [held("a\\\\/b\\/c", 1), held("x\n\u{1b}[2Jy", 2)];
        let drawn = tree("app", None, &locks);
        assert_eq!(drawn.lines().count(), 4, "{drawn}");
        assert!(drawn.contains("a\\\\"), "a backslash is escaped: {drawn}");
        assert!(drawn.contains("b\\/c"), "a slash in a segment is escaped: {drawn}");
        assert!(drawn.contains("x\\u{a}\\u{1b}[2Jy") && !drawn.contains('\u{1b}'), "{drawn}");
        let grant = [held_by("x\n1", Mode::Shared, "o", 1), held_by("x\n2", Mode::Exclusive, "o", 1)];
        assert_eq!(several_paths(&grant).lines().count(), 2, "{}", several_paths(&grant));
    }

    #[test]
    fn json_has_every_field() {
        let value = json(&[held("a\\/b/c", 9), held_by("d", Mode::Shared, "r", 10)]);
        assert_eq!(value[0]["segments"], serde_json::json!(["a/b", "c"]));
        assert_eq!(value[0]["path"], "a\\/b/c");
        assert_eq!(value[0]["mode"], "exclusive");
        assert_eq!(value[0]["remaining_ms"], 12_300);
        assert_eq!(value[0]["token"], 9);
        assert_eq!(value[1]["mode"], "shared");
    }

    #[test]
    fn why_lists_every_holder_in_the_way_of_the_mode_asked() {
        let listed = || {
            vec![
                held_by("eu", Mode::Shared, "reader-1", 3),
                held_by("eu", Mode::Shared, "reader-2", 4),
                held_by("eu/rack-1", Mode::Shared, "reader-3", 5),
                held_by("eu/rack-1/host-2", Mode::Exclusive, "patcher", 6),
                held_by("eu/rack-2", Mode::Exclusive, "sibling", 7),
            ]
        };
        let wanted = path("eu/rack-1");
        let exclusive = WhyAnswer::new(&wanted, Mode::Exclusive, listed());
        let owners: Vec<&str> = exclusive.blockers.iter().map(|lock| lock.owner.as_str()).collect();
        assert_eq!(owners, ["reader-1", "reader-2", "reader-3", "patcher"], "every shared holder, not only the first");
        let text = exclusive.text();
        assert!(text.starts_with("an exclusive lock on eu/rack-1 is blocked by 4 locks:\n"), "{text}");
        assert!(
            text.contains("  eu (an ancestor): held shared by \"reader-2\" for 12.3 s more, fencing token 4\n"),
            "{text}"
        );
        assert!(text.contains("  eu/rack-1/host-2 (a descendant): held exclusively by \"patcher\""), "{text}");
        assert!(!text.contains("sibling") && !text.contains("would not be in the way"), "{text}");

        let shared = WhyAnswer::new(&wanted, Mode::Shared, listed());
        let owners: Vec<&str> = shared.blockers.iter().map(|lock| lock.owner.as_str()).collect();
        assert_eq!(owners, ["patcher"], "shared holders do not block a shared lock");
        let text = shared.text();
        assert!(text.starts_with("a shared lock on eu/rack-1 is blocked by 1 lock:\n"), "{text}");
        assert!(text.ends_with("(3 shared locks on its branch would not be in the way)\n"), "{text}");
        let json = shared.json();
        assert_eq!(json["mode"], "shared");
        assert_eq!(json["free"], false);
        assert_eq!(json["blockers"].as_array().map(Vec::len), Some(1));
        assert_eq!(json["blockers"][0]["relation"], "a descendant");
        assert_eq!(json["blockers"][0]["mode"], "exclusive");

        let reader = path("eu/rack-3");
        let free = WhyAnswer::new(&reader, Mode::Shared, listed());
        assert_eq!(free.text(), "eu/rack-3 is free: a shared lock on it would be granted now\n(2 shared locks on its branch would not be in the way)\n");
        assert_eq!(free.json()["free"], true);
    }

    #[test]
    fn in_the_way_names_the_path_it_blocks() {
        let one = LockItems::one(path("eu/rack-1/host-2"), Mode::Exclusive);
        assert_eq!(in_the_way(&one, &held("eu/rack-1", 1)), "eu/rack-1 (an ancestor)");
        let two = LockItems::new([(path("dc/a"), Mode::Exclusive), (path("dc/b"), Mode::Shared)]).expect("valid");
        assert_eq!(in_the_way(&two, &held("dc/b/x", 1)), "dc/b/x (a descendant of dc/b)");
        assert_eq!(in_the_way(&two, &held("dc/a", 2)), "dc/a (the path itself)");
        assert_eq!(
            in_the_way(&two, &held_by("dc", Mode::Shared, "r", 3)),
            "dc (an ancestor of dc/a)",
            "a shared holder blocks the exclusive item"
        );
    }
}
