//! Arbitrary segment strings on a real store: the key encoding end to end.
//!
//! Core's encoding is checked on its own, by fuzzing and by proptests (see
//! `mutextree_core::checks`). But every store also carries the keys through
//! machinery of its own: Lua string functions and `ZRANGEBYLEX` in Redis,
//! `COLLATE "C"` text and `text[]` parameters in PostgreSQL, byte ranges and
//! a gRPC client in etcd. A segment holding `{`, `%`, `\`, a NUL or a
//! combining accent that the encoder gets right but the way to the store
//! mangles, or a range bound one byte off, shows only here.
//!
//! The property: paths built from generated segments (separators, escapes,
//! wildcards, braces, NFC and NFD forms of one letter, emoji, names that are
//! prefixes of each other like `A`, `AB` and `A/B`, up to a few hundred
//! bytes) are acquired without waiting by two clients of one namespace, and
//! some released. Every outcome must be the reference's, computed on the
//! segments alone (a lock is refused iff a live lock's segments are a prefix
//! of its own or the other way round); a refusal must name a live lock in
//! the way by its exact segments, owner and token; listing the namespace,
//! and the subtree of every path, must give exactly the live locks, segment
//! for segment. The segments are drawn from a small pool per case, each
//! with a twin an encoding bug would confuse with it (`A` and `AB`, `/` and
//! `%2F`, NFC and NFD), so that paths share prefixes and near misses often.
//!
//! No ttl runs out (they are long), so the property holds on a real clock
//! and costs only round trips: a few seconds per store.

use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::acquire;
use mutextree_core::backend::LockRequest;
use mutextree_core::checks::is_segment_prefix;
use mutextree_core::Wait;
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockPath, Owner, Ttl};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::{Algorithm, Ctx, TestStore};

const CLIENTS: usize = 2;
/// Long enough that no lock expires during a case on any store.
const TTL: Duration = Duration::from_secs(300);

/// Pieces that break encodings, glued together into segments.
const ATOMS: [&str; 24] = [
    "A", "AB", "B", "/", "\\", "%", "%2F", "%25", "*", "?", "[", "_", "{", "}", "{x}", ":", ";", " ", ".", "0",
    "\u{e9}", "e\u{301}", "🔒", "\0",
];

/// One step of a case.
#[derive(Clone, Debug)]
pub enum Step {
    /// `client` tries one of the case's paths without waiting.
    Acquire {
        /// Which client.
        client: usize,
        /// Which path.
        path: Index,
    },
    /// `client` releases one of the grants it ever got (live or not).
    Release {
        /// Which client.
        client: usize,
        /// Which of its grants.
        slot: Index,
    },
    /// The namespace is listed and compared with the reference.
    Inspect,
}

/// A generated case: its paths, and what the clients do with them.
#[derive(Clone, Debug)]
pub struct Case {
    /// The paths, each accepted by [`LockPath::new`].
    pub paths: Vec<LockPath>,
    /// The steps.
    pub steps: Vec<Step>,
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::collection::vec(prop::sample::select(&ATOMS[..]), 1..4).prop_map(|atoms| atoms.concat()),
        1 => "\\PC{1,8}",
        1 => any::<String>().prop_filter("a valid segment", |s| !s.is_empty() && s.len() <= 255),
        1 => (100usize..=255).prop_map(|bytes| "x".repeat(bytes)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..CLIENTS, any::<Index>()).prop_map(|(client, path)| Step::Acquire { client, path }),
        3 => (0..CLIENTS, any::<Index>()).prop_map(|(client, slot)| Step::Release { client, slot }),
        1 => Just(Step::Inspect),
    ]
}

/// A twin of a segment: related to it the way an encoding bug would
/// confuse, as a prefix, as its own escaped text, or as the other Unicode
/// normal form.
fn twin(base: &str, how: usize) -> String {
    match how % 8 {
        0 => format!("{base}B"),
        1 => format!("{base}/B"),
        2 => base.replace('%', "%25").replace('/', "%2F").replace('\0', "%00"),
        3 => base.replace("%2F", "/").replace("%25", "%"),
        4 => other_normal_form(base),
        5 => base.replace('\\', "\\\\").replace('/', "\\/"),
        6 => format!("{base}0"),
        _ => {
            let mut cut = base.to_owned();
            cut.pop();
            cut
        }
    }
}

/// `base` with every `é` in the other normal form (NFC `\u{e9}` and NFD
/// `e\u{301}` swapped).
fn other_normal_form(base: &str) -> String {
    let mut out = String::with_capacity(base.len() + 1);
    let mut rest = base;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("e\u{301}") {
            out.push('\u{e9}');
            rest = after;
        } else {
            out.push_str(if c == '\u{e9}' { "e\u{301}" } else { &rest[..c.len_utf8()] });
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Cases: a pool of one to three segments, each with a twin an encoding
/// bug would confuse with it, up to ten paths of depth one to three over
/// the pool (those [`LockPath::new`] refuses are dropped), and up to 24
/// steps.
pub fn case() -> impl Strategy<Value = Case> {
    let pool = proptest::collection::vec((segment(), any::<usize>()), 1..4);
    let shapes = proptest::collection::vec(proptest::collection::vec(any::<Index>(), 1..4), 1..10);
    let steps = proptest::collection::vec(step(), 1..24);
    (pool, shapes, steps).prop_filter_map("no path fits the limits", |(bases, shapes, steps)| {
        let pool: Vec<String> = bases.iter().flat_map(|(base, how)| [base.clone(), twin(base, *how)]).collect();
        let paths: Vec<LockPath> = shapes
            .iter()
            .filter_map(|shape| LockPath::new(shape.iter().map(|index| index.get(&pool).clone())).ok())
            .collect();
        (!paths.is_empty()).then_some(Case { paths, steps })
    })
}

/// Runs the property for a store; the body of the `segments` test of
/// [`suite!`](crate::suite).
pub fn check<S: TestStore>(store: fn() -> S, algorithm: Algorithm, paused: bool) {
    let config = Config {
        cases: if paused { 256 } else { 32 },
        failure_persistence: None,
        max_shrink_iters: if paused { 2048 } else { 128 },
        ..Config::default()
    };
    let outcome = TestRunner::new(config).run(&case(), |case| {
        let runtime = if paused {
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        }
        .expect("runtime");
        let store: Arc<dyn TestStore> = Arc::new(store());
        // A hang is a failure, as in every case of the suite.
        let limit = store.timing().unit * 100;
        runtime
            .block_on(async move { tokio::time::timeout(limit, run_case(store, algorithm, case)).await })
            .unwrap_or_else(|_| Err(format!("the case did not finish within {limit:?}")))
            .map_err(TestCaseError::fail)
    });
    if let Err(error) = outcome {
        panic!("the store disagrees with the reference on arbitrary segments: {error}");
    }
}

/// A live lock of the reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Live {
    segments: Vec<String>,
    owner: String,
    token: u64,
}

impl Live {
    fn of_grant(grant: &Grant) -> Self {
        Live { segments: segments(grant.path()), owner: grant.owner.as_str().to_owned(), token: grant.token }
    }

    fn of_held(held: &HeldLock) -> Self {
        Live { segments: segments(&held.path), owner: held.owner.as_str().to_owned(), token: held.token }
    }
}

fn segments(path: &LockPath) -> Vec<String> {
    path.segments().map(str::to_owned).collect()
}

async fn run_case(store: Arc<dyn TestStore>, algorithm: Algorithm, case: Case) -> Result<(), String> {
    let ctx = Ctx::new(store, algorithm);
    let mut clients: Vec<Arc<dyn LockBackend>> = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(ctx.client().await);
    }
    let owners: Vec<Owner> = (0..CLIENTS).map(|c| Owner::new(format!("client-{c}")).expect("owner")).collect();
    let ttl = Ttl::new(TTL).expect("ttl");
    let mut granted: Vec<Vec<Grant>> = vec![Vec::new(); CLIENTS];
    let mut live: Vec<(LockPath, Live)> = Vec::new();

    for (number, step) in case.steps.iter().enumerate() {
        let fail = |what: String| format!("step {number} {step:?}: {what}");
        match step {
            Step::Acquire { client, path } => {
                let path = path.get(&case.paths);
                let request = LockRequest::new(path.clone(), owners[*client].clone(), ttl);
                let outcome = acquire(&clients[*client], &request, Wait::No).await;
                let in_the_way: Vec<&Live> = live
                    .iter()
                    .filter(|(held, _)| is_segment_prefix(held, path) || is_segment_prefix(path, held))
                    .map(|(_, lock)| lock)
                    .collect();
                match (outcome, in_the_way.is_empty()) {
                    (Ok(grant), true) => {
                        let got = Live::of_grant(&grant);
                        if got.segments != segments(path) || got.owner != owners[*client].as_str() {
                            return Err(fail(format!("asked for {path:?}, granted {got:?}")));
                        }
                        live.push((grant.path().clone(), got));
                        granted[*client].push(grant);
                    }
                    (Err(Error::Refused { blockers, .. }), false) => {
                        let blocker = blockers.first();
                        let named = Live::of_held(blocker);
                        if !in_the_way.contains(&&named) {
                            return Err(fail(format!("{path:?} refused by {named:?}, not one of {in_the_way:?}")));
                        }
                    }
                    (outcome, _) => {
                        return Err(fail(format!("{path:?}: the store said {outcome:?}, the reference {in_the_way:?}")))
                    }
                }
            }
            Step::Release { client, slot } => {
                if granted[*client].is_empty() {
                    continue;
                }
                let grant = slot.get(&granted[*client]).clone();
                let outcome = clients[*client].release(&grant).await;
                let index = live.iter().position(|(_, lock)| *lock == Live::of_grant(&grant));
                match (outcome, index) {
                    (Ok(()), Some(index)) => {
                        live.remove(index);
                    }
                    (Err(Error::NotHeld { .. }), None) => {}
                    (outcome, index) => {
                        return Err(fail(format!(
                            "the store said {outcome:?}, the reference live: {}",
                            index.is_some()
                        )))
                    }
                }
            }
            Step::Inspect => inspect(&*clients[0], None, &live).await.map_err(fail)?,
        }
    }

    // At the end: the namespace, and the subtree of every path.
    inspect(&*clients[1], None, &live).await.map_err(|what| format!("at the end: {what}"))?;
    for path in &case.paths {
        inspect(&*clients[0], Some(path), &live).await.map_err(|what| format!("at the end: {what}"))?;
    }
    for (client, grants) in granted.iter().enumerate() {
        for grant in grants {
            if live.iter().any(|(_, lock)| *lock == Live::of_grant(grant)) {
                clients[client].release(grant).await.map_err(|e| format!("releasing {grant:?} at the end: {e}"))?;
            }
        }
    }
    Ok(())
}

/// `list(under)` against the reference's live locks at and below `under`.
async fn inspect(client: &dyn LockBackend, under: Option<&LockPath>, live: &[(LockPath, Live)]) -> Result<(), String> {
    let listed = client.list(under).await.map_err(|e| format!("list under {under:?} failed: {e}"))?;
    let mut actual: Vec<Live> = listed.iter().map(Live::of_held).collect();
    let mut expected: Vec<Live> = live
        .iter()
        .filter(|(path, _)| under.is_none_or(|under| is_segment_prefix(under, path)))
        .map(|(_, lock)| lock.clone())
        .collect();
    actual.sort();
    expected.sort();
    if actual != expected {
        return Err(format!("under {under:?} the store lists {actual:?}, the reference {expected:?}"));
    }
    Ok(())
}
