//! `mutextree status` and `mutextree why`: who holds what, and what is in
//! the way.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use mutextree::backend::human;
use mutextree::{Error, HeldLock, LockBackend, LockPath};

use crate::{exit, parse_path};

/// Show the locks held at and under PATH (or in the whole namespace) as a
/// tree: owner, remaining life and fencing token of each.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 status
  mutextree status eu-west --json | jq '.[].owner'")]
pub(crate) struct Status {
    /// Where to look (default: the whole namespace).
    #[arg(value_parser = parse_path)]
    path: Option<LockPath>,

    /// A JSON array instead of a tree, one object per lock.
    #[arg(long)]
    json: bool,
}

impl Status {
    pub(crate) async fn execute(self, store: &Arc<dyn LockBackend>, namespace: &str) -> Result<ExitCode, Error> {
        let held = store.list(self.path.as_ref()).await?;
        let namespace = visible(namespace);
        if self.json {
            println!("{}", json(&held));
        } else if held.is_empty() {
            match &self.path {
                Some(path) => println!("no locks held at or under {} in namespace {namespace}", shown(path)),
                None => println!("no locks held in namespace {namespace}"),
            }
        } else {
            print!("{}", tree(&namespace, self.path.as_ref(), &held));
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Say what would block a lock on PATH right now, and for how long; exit 3
/// if something does.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 why eu-west/rack-12/host-7
  mutextree why eu-west/rack-12 --json | jq '.blockers[].owner'")]
pub(crate) struct Why {
    /// The path that would be locked.
    #[arg(value_parser = parse_path)]
    path: LockPath,

    /// A JSON object instead of text: the path, whether it is free, and
    /// the locks in the way (as `status --json` lists them, each with its
    /// relation to the path).
    #[arg(long)]
    json: bool,
}

impl Why {
    pub(crate) async fn execute(self, store: &Arc<dyn LockBackend>) -> Result<ExitCode, Error> {
        // Everything under the path's root holds its ancestors and its
        // subtree; the listing asks the store once.
        let root = LockPath::new([self.path.segments().next().unwrap_or_default()])?;
        let blockers: Vec<HeldLock> =
            store.list(Some(&root)).await?.into_iter().filter(|lock| lock.path.overlaps(&self.path)).collect();
        if self.json {
            let listed = blockers.iter().map(|lock| {
                let mut object = lock_json(lock);
                object["relation"] = relation(&lock.path, &self.path).into();
                object
            });
            let answer = serde_json::json!({
                "path": self.path.to_string(),
                "free": blockers.is_empty(),
                "blockers": listed.collect::<Vec<_>>(),
            });
            println!("{answer}");
        } else if blockers.is_empty() {
            println!("{} is free: a lock on it would be granted now", shown(&self.path));
        } else {
            let count = blockers.len();
            println!("{} is blocked by {count} lock{}:", shown(&self.path), if count == 1 { "" } else { "s" });
            for lock in &blockers {
                println!("  {} ({}): {}", shown(&lock.path), relation(&lock.path, &self.path), describe(lock));
            }
        }
        Ok(if blockers.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(exit::REFUSED) })
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

/// A path as the command prints it: its text form (`\\/` for a slash in a
/// segment), with control characters shown as escapes, so that no name can
/// break the layout or drive the terminal.
pub(crate) fn shown(path: &LockPath) -> String {
    visible(&path.to_string())
}

fn visible(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// `held by OWNER for 12.3 s more, fencing token 17`.
pub(crate) fn describe(lock: &HeldLock) -> String {
    let transient = if lock.transient { ", a stepwise client's passing parent lock" } else { "" };
    format!("held by {} for {} more, fencing token {}{transient}", lock.owner, human(lock.remaining), lock.token)
}

/// The locks as `tree(1)` draws directories: nodes by name under `root`
/// (or the namespace), each lock's details beside its node, below a line
/// naming the namespace (and the root).
fn tree(namespace: &str, root: Option<&LockPath>, held: &[HeldLock]) -> String {
    #[derive(Default)]
    struct Node<'a> {
        lock: Option<&'a HeldLock>,
        children: BTreeMap<&'a str, Node<'a>>,
    }
    let skip = root.map_or(0, LockPath::depth);
    let mut top = Node::default();
    for lock in held {
        let mut node = &mut top;
        for segment in lock.path.segments().skip(skip) {
            node = node.children.entry(segment).or_default();
        }
        node.lock = Some(lock);
    }
    fn draw(out: &mut String, node: &Node<'_>, prefix: &str) {
        let count = node.children.len();
        for (index, (name, child)) in node.children.iter().enumerate() {
            let last = index + 1 == count;
            let name = LockPath::new([*name]).map_or_else(|_| visible(name), |one| shown(&one));
            let _ = write!(out, "{prefix}{}{name}", if last { "└── " } else { "├── " });
            if let Some(lock) = child.lock {
                let _ = write!(out, "  [{}]", describe(lock));
            }
            out.push('\n');
            draw(out, child, &format!("{prefix}{}", if last { "    " } else { "│   " }));
        }
    }
    let mut out = match root {
        Some(root) => format!("namespace {namespace}: {}", shown(root)),
        None => format!("namespace {namespace}"),
    };
    if let Some(lock) = top.lock {
        let _ = write!(out, "  [{}]", describe(lock));
    }
    out.push('\n');
    draw(&mut out, &top, "");
    out
}

fn json(held: &[HeldLock]) -> serde_json::Value {
    held.iter().map(lock_json).collect()
}

/// One lock as `status --json` lists it.
fn lock_json(lock: &HeldLock) -> serde_json::Value {
    serde_json::json!({
        "path": lock.path.to_string(),
        "segments": lock.path.segments().collect::<Vec<_>>(),
        "owner": lock.owner.as_str(),
        "remaining_ms": u64::try_from(lock.remaining.as_millis()).unwrap_or(u64::MAX),
        "token": lock.token,
        "transient": lock.transient,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mutextree::Owner;

    use super::*;

    fn held(path: &str, token: u64) -> HeldLock {
        HeldLock {
            path: LockPath::parse(path).expect("path"),
            owner: Owner::new("web-1").expect("owner"),
            token,
            remaining: Duration::from_millis(12_300),
            transient: false,
        }
    }

    #[test]
    fn a_tree_like_tree_draws_it() {
        let locks = [held("eu/rack-1", 3), held("eu/rack-2/host-1", 4), held("eu/rack-2/host-2", 5), held("us", 6)];
        let drawn = tree("app", None, &locks);
        let expected = "namespace app
├── eu
│   ├── rack-1  [held by \"web-1\" for 12.3 s more, fencing token 3]
│   └── rack-2
│       ├── host-1  [held by \"web-1\" for 12.3 s more, fencing token 4]
│       └── host-2  [held by \"web-1\" for 12.3 s more, fencing token 5]
└── us  [held by \"web-1\" for 12.3 s more, fencing token 6]
";
        assert_eq!(drawn, expected);
        let under = tree("app", Some(&LockPath::parse("eu/rack-2").expect("path")), &locks[1..3]);
        assert!(under.starts_with("namespace app: eu/rack-2\n├── host-1"), "{under}");
    }

    #[test]
    fn names_cannot_break_the_tree() {
        let locks = [held("a\\\\/b\\/c", 1), held("x\n\u{1b}[2Jy", 2)];
        let drawn = tree("app", None, &locks);
        assert_eq!(drawn.lines().count(), 4, "{drawn}");
        assert!(drawn.contains("a\\\\"), "a backslash is escaped: {drawn}");
        assert!(drawn.contains("b\\/c"), "a slash in a segment is escaped: {drawn}");
        assert!(drawn.contains("x\\u{a}\\u{1b}[2Jy") && !drawn.contains('\u{1b}'), "{drawn}");
    }

    #[test]
    fn json_has_every_field() {
        let value = json(&[held("a\\/b/c", 9)]);
        assert_eq!(value[0]["segments"], serde_json::json!(["a/b", "c"]));
        assert_eq!(value[0]["path"], "a\\/b/c");
        assert_eq!(value[0]["remaining_ms"], 12_300);
        assert_eq!(value[0]["token"], 9);
    }
}
