//! The cases of Shared and multi-path grants and of mode changes, each a
//! plain `async fn(Ctx)` like the rest of [`cases`](crate::cases), which
//! re-exports them.
//!
//! The rule under test: two live items of different grants conflict iff
//! their paths are comparable and not both Shared, the same owner
//! included. A Shared item covers its whole subtree, so Shared on `[A]`
//! keeps an Exclusive item off `[A, B, C]` as well as off `[A]`: the case
//! read/write tree locks that read-lock only the ancestors get wrong.
//!
//! The stepwise algorithm grants single Exclusive items only. Under it,
//! each case checks instead that its first Shared or multi-path request is
//! refused with [`Error::Unsupported`] and leaves nothing held
//! (`unsupported_here`), and stops there; the parts of a case that need
//! no store (normalisation, limits) run under every algorithm.

use std::sync::Arc;

use futures::future::join_all;
use mutextree_core::{Error, Grant, LockBackend, LockItem, LockItems, LockPath, Mode, TreeLock, TreeLockBuilder, Ttl};
use tokio::time::sleep;

use crate::cancel::Gated;
use crate::cases::{long, path};
use crate::Ctx;

use Mode::{Exclusive, Shared};

/// Items as a case writes them: path text and mode.
pub(crate) type Asked<'a> = &'a [(&'a str, Mode)];

/// A handle on `items`, with a ttl no case outlives.
pub(crate) fn handle_of(ctx: &Ctx, client: &Arc<dyn LockBackend>, items: Asked<'_>) -> TreeLock {
    TreeLockBuilder::<TreeLock>::many(client.clone(), items.iter().map(|&(at, mode)| (path(at), mode)))
        .ttl(long(ctx))
        .build()
        .expect("valid items")
}

/// Acquires `items` without waiting; they must be free.
async fn hold_items(ctx: &Ctx, client: &Arc<dyn LockBackend>, items: Asked<'_>) -> TreeLock {
    let lock = handle_of(ctx, client, items);
    lock.try_acquire().await.unwrap_or_else(|e| panic!("{items:?} should be free: {e}"));
    lock
}

/// The grant a handle holds.
fn held(lock: &TreeLock) -> Grant {
    lock.grant().expect("the handle holds its grant")
}

/// Under an algorithm that cannot grant Shared or multi-path requests (the
/// stepwise one): asserts that `items` is refused with
/// [`Error::Unsupported`] and that nothing is held, and returns true, so
/// that the case stops there. Under the others, returns false.
pub(crate) async fn unsupported_here(ctx: &Ctx, items: Asked<'_>) -> bool {
    if ctx.algorithm().grants_modes() {
        return false;
    }
    let client = ctx.client().await;
    let lock = handle_of(ctx, &client, items);
    match lock.try_acquire().await {
        Err(Error::Unsupported { .. }) => {}
        other => panic!("{items:?} under {:?} should be unsupported, got {other:?}", ctx.algorithm()),
    }
    assert!(!lock.is_held());
    assert!(client.list(None).await.expect("list").is_empty(), "an unsupported request left something held");
    true
}

/// Asserts that `asked` is refused and that the store names a blocker for
/// each blocked item, in the request's item order: the `i`-th blocker is an
/// item (path, mode, owner and token) of one of the grants in
/// `blocked_by[i]`, and conflicts with an item asked for.
async fn assert_blocked(ctx: &Ctx, client: &Arc<dyn LockBackend>, asked: Asked<'_>, blocked_by: &[&[&Grant]]) {
    let lock = handle_of(ctx, client, asked);
    let (items, blockers) = match lock.try_acquire().await {
        Err(Error::Refused { items, blockers }) => (items, blockers),
        other => panic!("{asked:?} should be refused, got {other:?}"),
    };
    assert_eq!(&items, lock.items(), "the refusal names what was asked");
    assert_eq!(blockers.len(), blocked_by.len(), "{asked:?}: one blocker per blocked item, got {blockers:?}");
    for (blocker, options) in blockers.iter().zip(blocked_by) {
        let known = options.iter().any(|grant| {
            grant.token == blocker.token
                && grant.owner == blocker.owner
                && grant.items.iter().any(|item| item.path == blocker.path && item.mode == blocker.mode)
        });
        assert!(known, "{asked:?} blocked by {blocker}, expected an item of {options:?}");
        let blocking = LockItem { path: blocker.path.clone(), mode: blocker.mode };
        assert!(items.iter().any(|item| crate::oracle::items_conflict(item, &blocking)), "{blocker} blocks nothing");
        assert!(!blocker.remaining.is_zero() && blocker.remaining <= long(ctx), "{blocker}");
    }
    let message = Error::Refused { items, blockers: blockers.clone() }.to_string();
    for blocker in &blockers {
        assert!(message.contains(&blocker.path.to_string()), "{message}");
    }
    assert!(!lock.is_held());
}

/// What a client lists, as (path, mode, token), in key order.
async fn listed(client: &Arc<dyn LockBackend>, under: Option<&str>) -> Vec<(String, Mode, u64)> {
    let under = under.map(path);
    let held = client.list(under.as_ref()).await.expect("list");
    held.into_iter().map(|lock| (lock.path.to_string(), lock.mode, lock.token)).collect()
}

/// Two readers (two clients, and the same owner twice) hold `[A]` at once;
/// a writer is refused `[A]` and `[A, B]` by a reader until both are gone.
pub async fn shared_holders_coexist_on_one_path(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared)]).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    let first = hold_items(&ctx, &one, &[("A", Shared)]).await;
    let second = hold_items(&ctx, &two, &[("A", Shared)]).await;
    let same_owner = TreeLockBuilder::<TreeLock>::new(one.clone(), path("A"))
        .shared()
        .owner(first.owner().as_str())
        .ttl(long(&ctx))
        .build()
        .expect("lock");
    same_owner.try_acquire().await.expect("Shared and Shared never conflict, even for one owner");
    let readers = [held(&first), held(&second), held(&same_owner)];
    let mut expected: Vec<(String, Mode, u64)> = readers.iter().map(|g| ("A".to_owned(), Shared, g.token)).collect();
    expected.sort_by_key(|&(_, _, token)| token);
    let mut seen = listed(&two, None).await;
    seen.sort_by_key(|&(_, _, token)| token);
    assert_eq!(seen, expected, "three Shared items on A, each its own token");

    let all: Vec<&Grant> = readers.iter().collect();
    for at in ["A", "A/B"] {
        assert_blocked(&ctx, &two, &[(at, Exclusive)], &[&all]).await;
    }
    first.release().await.expect("release");
    same_owner.release().await.expect("release");
    let left = [&readers[1]];
    assert_blocked(&ctx, &one, &[("A/B", Exclusive)], &[&left]).await;
    second.release().await.expect("release");
    hold_items(&ctx, &one, &[("A/B", Exclusive)]).await;
}

/// `holding` on `[A]` refuses `asked` (a conflicting mode) on `[A]` and
/// below; `holding` on `[A, B, C]` refuses it on `[A, B, C]`, below and on
/// every ancestor; a cousin in `asked` is granted beside it.
async fn refused_along_the_branch(ctx: &Ctx, holding: Mode, asked: Mode) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let above = hold_items(ctx, &one, &[("A", holding)]).await;
    for at in ["A/B/C", "A/B", "A"] {
        assert_blocked(ctx, &two, &[(at, asked)], &[&[&held(&above)]]).await;
    }
    above.release().await.expect("release");
    let below = hold_items(ctx, &one, &[("A/B/C", holding)]).await;
    for at in ["A", "A/B", "A/B/C", "A/B/C/D"] {
        assert_blocked(ctx, &two, &[(at, asked)], &[&[&held(&below)]]).await;
    }
    hold_items(ctx, &two, &[("A/B/D", asked)]).await;
}

/// Shared on `[A]` covers its subtree: it refuses Exclusive on `[A]`,
/// `[A, B]` and `[A, B, C]` (where read/write tree locks that read-lock
/// only the ancestors let it in), yet lets Shared in there; Shared on
/// `[A, B, C]` refuses Exclusive on its ancestors.
pub async fn shared_ancestor_refuses_exclusive_descendant(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared)]).await {
        return;
    }
    refused_along_the_branch(&ctx, Shared, Exclusive).await;
    let client = ctx.client().await;
    let readers =
        [hold_items(&ctx, &client, &[("R", Shared)]).await, hold_items(&ctx, &client, &[("R/B/C", Shared)]).await];
    let grants = [held(&readers[0]), held(&readers[1])];
    assert_blocked(&ctx, &client, &[("R/B/C/D", Exclusive)], &[&[&grants[0], &grants[1]]]).await;
}

/// Exclusive on `[A]` refuses Shared on `[A]` and `[A, B, C]`; Exclusive on
/// `[A, B, C]` refuses Shared on its ancestors.
pub async fn exclusive_ancestor_refuses_shared_descendant(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A/B/C", Shared)]).await {
        return;
    }
    refused_along_the_branch(&ctx, Exclusive, Shared).await;
}

/// Siblings and cousins never refuse each other, whatever their modes,
/// alone or in multi-path requests; their common ancestor is refused in
/// the mode that conflicts.
pub async fn siblings_never_conflict_in_any_mode(ctx: Ctx) {
    if unsupported_here(&ctx, &[("P/x", Shared), ("Q/y", Exclusive)]).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    for (round, left) in [Shared, Exclusive].into_iter().enumerate() {
        for (column, right) in [Shared, Exclusive].into_iter().enumerate() {
            let parent = format!("P{round}{column}");
            let (x, y, cousin) = (format!("{parent}/x"), format!("{parent}/y"), format!("{parent}/z/deep"));
            let w = format!("{parent}/w");
            let first = hold_items(&ctx, &one, &[(&x, left)]).await;
            let second = hold_items(&ctx, &two, &[(&y, right)]).await;
            let third = hold_items(&ctx, &two, &[(&cousin, left), (&w, right)]).await;
            let grants = [held(&first), held(&second), held(&third)];
            let options: Vec<&Grant> = grants.iter().collect();
            // Exclusive on the parent conflicts with every child.
            assert_blocked(&ctx, &one, &[(&parent, Exclusive)], &[&options]).await;
        }
    }
    // Multi-path requests of siblings in both modes, beside all of them.
    hold_items(&ctx, &one, &[("P00/v", Exclusive), ("P11/v", Shared), ("P01/v/deep", Exclusive)]).await;
}

/// Two readers of `[A]` race to upgrade: neither may win while the other
/// reads (at most one winner is the rule; with both reading, none), each
/// is refused naming the other, and both grants stay as they were. Once
/// one lets go, the other's upgrade is granted with a greater token.
pub async fn racing_upgrades_never_both_win(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared)]).await {
        return;
    }
    for (round, (first_at, second_at)) in [("A", "A"), ("B", "B/C"), ("D/E", "D")].into_iter().enumerate() {
        let (one, two) = (ctx.client().await, ctx.client().await);
        let first = hold_items(&ctx, &one, &[(first_at, Shared)]).await;
        let second = hold_items(&ctx, &two, &[(second_at, Shared)]).await;
        let before = [held(&first), held(&second)];
        let racers = [first.clone(), second.clone()].map(|lock| tokio::spawn(async move { lock.upgrade().await }));
        let outcomes: Vec<Result<Grant, Error>> =
            join_all(racers).await.into_iter().map(|outcome| outcome.expect("upgrade task")).collect();
        let winners = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        assert!(winners <= 1, "round {round}: both upgrades won: {outcomes:?}");
        for (index, outcome) in outcomes.into_iter().enumerate() {
            let other = &before[1 - index];
            match outcome {
                Err(Error::Refused { items, blockers }) => {
                    assert_eq!(items, before[index].items.with_mode(Exclusive));
                    let blocker = blockers.first();
                    assert_eq!(blockers.len(), 1, "{blockers:?}");
                    assert_eq!((blocker.token, blocker.mode), (other.token, Shared), "round {round}: {blocker}");
                    assert_eq!(blocker.owner, other.owner);
                }
                other => panic!("round {round}: an upgrade beside a reader must be refused, got {other:?}"),
            }
        }
        assert_eq!([held(&first), held(&second)], before, "a refused upgrade leaves the grant as it was");
        let mut expected: Vec<(String, Mode, u64)> =
            before.iter().map(|g| (g.path().to_string(), Shared, g.token)).collect();
        let mut seen = listed(&one, None).await;
        expected.sort();
        seen.sort();
        assert_eq!(seen, expected, "round {round}: the store still has both readers");

        second.release().await.expect("release");
        let upgraded = first.upgrade().await.expect("alone, the reader upgrades");
        assert!(upgraded.token > before[1].token.max(before[0].token), "{upgraded:?}");
        assert_eq!(upgraded.items, before[0].items.with_mode(Exclusive));
        assert_blocked(&ctx, &two, &[(second_at, Shared)], &[&[&upgraded]]).await;
        first.release().await.expect("release the upgraded grant");
        assert!(one.list(None).await.expect("list").is_empty());
    }
}

/// A writer downgrades its guard: readers get in at once, a writer stays
/// out, the old token is dead; the reader's upgrade is refused while other
/// readers hold, and granted once they are gone.
pub async fn a_downgrade_lets_readers_in_and_keeps_writers_out(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared)]).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    let writer = handle_of(&ctx, &one, &[("A", Exclusive)]);
    let mut guard = writer.try_lock().await.expect("free");
    let exclusive = guard.grant().clone();
    assert_blocked(&ctx, &two, &[("A/B", Shared)], &[&[&exclusive]]).await;

    let shared = guard.downgrade().await.expect("a downgrade succeeds while held").clone();
    assert!(shared.token > exclusive.token, "a downgrade takes a new token: {shared:?}");
    assert_eq!(shared.items, exclusive.items.with_mode(Shared));
    assert_eq!(shared.owner, exclusive.owner);
    assert_eq!(writer.grant().map(|g| g.token), Some(shared.token), "the handle follows the guard");
    assert_eq!(listed(&two, None).await, [("A".to_owned(), Shared, shared.token)]);
    assert!(matches!(two.release(&exclusive).await, Err(Error::NotHeld { .. })), "the old token is dead");

    let readers = [hold_items(&ctx, &two, &[("A/B", Shared)]).await, hold_items(&ctx, &two, &[("A", Shared)]).await];
    let reader_grants = [held(&readers[0]), held(&readers[1])];
    let everyone = [&shared, &reader_grants[0], &reader_grants[1]];
    assert_blocked(&ctx, &two, &[("A/B/C", Exclusive)], &[&everyone]).await;

    let others: Vec<&Grant> = reader_grants.iter().collect();
    match guard.upgrade().await {
        Err(Error::Refused { blockers, .. }) => {
            let blocker = blockers.first();
            assert!(others.iter().any(|g| g.token == blocker.token), "refused by {blocker}, not a reader");
        }
        other => panic!("an upgrade beside readers must be refused, got {other:?}"),
    }
    assert_eq!(guard.token(), shared.token, "a refused upgrade keeps the grant");
    for reader in &readers {
        reader.release().await.expect("release");
    }
    let upgraded = guard.upgrade().await.expect("alone again").clone();
    assert!(upgraded.token > reader_grants[1].token.max(reader_grants[0].token));
    assert_blocked(&ctx, &two, &[("A/B", Shared)], &[&[&upgraded]]).await;
    guard.release().await.expect("release");
}

/// A stepwise client takes its node's key before it looks below it, and
/// its token with that key. A downgrade below that key in the meantime
/// would take a newer token, so that if its holder then released, the
/// stepwise grant would go through holding an older token than a
/// conflicting holder before it: a fenced resource would turn it away. So
/// a downgrade, like an upgrade, is refused while a conflicting lock is
/// live; only such a lock in progress can conflict with a live grant.
pub async fn a_downgrade_is_refused_under_a_stepwise_lock_in_progress(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared)]).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    let writer = handle_of(&ctx, &one, &[("A/B/C", Exclusive)]);
    let mut guard = writer.try_lock().await.expect("free");
    let before = guard.grant().clone();
    // The stepwise client's second step: the node's own key, nothing else.
    let owner = mutextree_core::Owner::new("stepwise").expect("owner");
    let key_lock = mutextree_core::backend::LockRequest::new(path("A"), owner, Ttl::new(long(&ctx)).expect("ttl"));
    let key = match two.try_lock_key(&key_lock, mutextree_core::backend::LockKind::Lock).await.expect("key") {
        mutextree_core::backend::Attempt::Granted(key) => key,
        other => panic!("the key of A is free: {other:?}"),
    };
    match guard.downgrade().await {
        Err(Error::Refused { blockers, .. }) => assert_eq!(blockers.first().token, key.token, "{blockers:?}"),
        other => panic!("a downgrade under a stepwise lock in progress must be refused, got {other:?}"),
    }
    assert_eq!(guard.token(), before.token, "a refused downgrade keeps the grant");
    two.release(&key).await.expect("the stepwise client finds A/B/C below and lets go");
    let shared = guard.downgrade().await.expect("nothing in the way now").clone();
    assert!(shared.token > key.token);
    guard.release().await.expect("release");
}

/// A mode change applies to every item at once, takes a token above every
/// earlier one, keeps the expiry (it does not extend the life), and kills
/// the old token for release, refresh and further changes.
pub async fn a_mode_change_takes_a_new_token_and_keeps_the_expiry(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Shared), ("B/x", Shared)]).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();
    let lock = TreeLockBuilder::<TreeLock>::many(one.clone(), [(path("A"), Shared), (path("B/x"), Shared)])
        .ttl(timing.unit * 3)
        .build()
        .expect("lock");
    let first = lock.try_acquire().await.expect("free");
    let elsewhere = hold_items(&ctx, &two, &[("C", Exclusive)]).await;
    sleep(timing.unit).await;
    let upgraded = lock.upgrade().await.expect("nothing else on A or B/x");
    assert!(upgraded.token > held(&elsewhere).token && upgraded.token > first.token, "{upgraded:?}");
    assert_eq!(upgraded.items, first.items.with_mode(Exclusive));
    assert!(
        upgraded.expires_at <= first.expires_at + timing.slack,
        "the change moved the expiry: {upgraded:?} after {first:?}"
    );
    let after = two.list(None).await.expect("list");
    for item in after.iter().filter(|item| item.token == upgraded.token) {
        assert_eq!(item.mode, Exclusive, "{item}");
        assert!(item.remaining <= first.ttl - timing.unit + timing.slack, "the change extended the life: {item}");
    }
    assert_eq!(after.iter().filter(|item| item.token == upgraded.token).count(), 2, "{after:?}");

    let ttl = Ttl::new(long(&ctx)).expect("ttl");
    assert!(matches!(one.release(&first).await, Err(Error::NotHeld { .. })));
    assert!(matches!(one.refresh(&first, ttl).await, Err(Error::NotHeld { .. })));
    assert!(matches!(one.change_mode(&first, Exclusive).await, Err(Error::NotHeld { .. })));
    assert!(matches!(lock.upgrade().await, Err(Error::InvalidRequest { .. })), "Exclusive already");

    let downgraded = lock.downgrade().await.expect("a downgrade succeeds while held");
    assert!(downgraded.token > upgraded.token);
    assert!(matches!(one.change_mode(&upgraded, Shared).await, Err(Error::NotHeld { .. })));
    lock.release().await.expect("release");
    assert!(matches!(one.change_mode(&downgraded, Exclusive).await, Err(Error::NotHeld { .. })), "released");
    assert!(matches!(lock.upgrade().await, Err(Error::NotHeld { .. })), "nothing held");
    assert_eq!(listed(&two, None).await, [("C".to_owned(), Exclusive, held(&elsewhere).token)]);
}

/// A refused multi-path request names a blocker for each blocked item, in
/// its item order, and holds none of its items, not even the free ones.
pub async fn a_multi_path_refusal_names_every_blocked_item(ctx: Ctx) {
    if unsupported_here(&ctx, &[("A", Exclusive), ("B", Exclusive)]).await {
        return;
    }
    let (one, two, three) = (ctx.client().await, ctx.client().await, ctx.client().await);
    let writer = held(&hold_items(&ctx, &one, &[("A/B", Exclusive)]).await);
    let reader = held(&hold_items(&ctx, &two, &[("C", Shared)]).await);
    let both = held(&hold_items(&ctx, &two, &[("E/x", Exclusive), ("F", Shared)]).await);
    let before = listed(&one, None).await;

    assert_blocked(&ctx, &three, &[("A", Exclusive), ("C/D", Exclusive), ("D", Exclusive)], &[&[&writer], &[&reader]])
        .await;
    assert_blocked(&ctx, &three, &[("D", Exclusive), ("C", Exclusive)], &[&[&reader]]).await;
    assert_blocked(
        &ctx,
        &three,
        &[("F/y", Exclusive), ("E", Shared), ("A/B/C", Shared)],
        &[&[&writer], &[&both], &[&both]],
    )
    .await;
    assert_eq!(listed(&three, None).await, before, "a refused request holds nothing");
    hold_items(&ctx, &three, &[("D", Exclusive), ("C/x", Shared), ("F/y", Shared)]).await;
}

/// All items of a multi-path grant share one token, one owner and one
/// fate: listed together, refreshed together, released together, and
/// lost together when an administrator releases the grant.
pub async fn a_multi_path_grant_shares_one_token_and_one_fate(ctx: Ctx) {
    let asked = [("A/x", Exclusive), ("B", Shared), ("C/y/z", Exclusive)];
    if unsupported_here(&ctx, &asked).await {
        return;
    }
    let (one, two) = (ctx.client().await, ctx.client().await);
    let unit = ctx.timing().unit;
    let lock = TreeLockBuilder::<TreeLock>::many(one.clone(), asked.iter().map(|&(at, mode)| (path(at), mode)))
        .ttl(unit * 3)
        .auto_refresh(true)
        .build()
        .expect("lock");
    let grant = lock.try_acquire().await.expect("free");
    let seen = two.list(None).await.expect("list");
    let expected: Vec<(String, Mode, u64)> =
        asked.iter().map(|&(at, mode)| (at.to_owned(), mode, grant.token)).collect();
    assert_eq!(listed(&two, None).await, expected);
    assert!(seen.iter().all(|item| item.owner == grant.owner), "{seen:?}");
    for at in ["A", "B/q", "C/y"] {
        assert_blocked(&ctx, &two, &[(at, Exclusive)], &[&[&grant]]).await;
    }
    hold_items(&ctx, &two, &[("B/q", Shared), ("A/w", Exclusive)]).await;

    sleep(unit * 4).await;
    let kept = lock.grant().expect("kept by automatic refresh");
    assert_eq!(kept.token, grant.token, "a refresh keeps the token");
    // A refresh sets one expiry for every item (the automatic refresh may
    // come between, and set another, for every item as well).
    let refreshed = lock.refresh_to(unit * 20).await.expect("refresh");
    let remaining: Vec<_> = two
        .list(None)
        .await
        .expect("list")
        .iter()
        .filter(|item| item.token == grant.token)
        .map(|item| item.remaining)
        .collect();
    let (shortest, longest) = (remaining.iter().min().copied(), remaining.iter().max().copied());
    assert_eq!(remaining.len(), asked.len());
    assert!(longest <= Some(refreshed.ttl) && longest <= shortest.map(|s| s + ctx.timing().slack), "{remaining:?}");
    two.release(&refreshed).await.expect("an administrator releases the grant");
    assert!(
        two.list(None).await.expect("list").iter().all(|item| item.token != grant.token),
        "a forced release releases every item"
    );
    let error = tokio::time::timeout(unit * 4, lock.lost()).await.expect("the loss is reported");
    match error {
        Error::Lost { items, .. } => assert_eq!(items, grant.items),
        other => panic!("expected a loss, got {other:?}"),
    }

    let again = hold_items(&ctx, &one, &[("A/x", Exclusive), ("C", Shared)]).await;
    again.release().await.expect("release");
    assert!(listed(&one, Some("A/x")).await.is_empty() && listed(&one, Some("C")).await.is_empty());
}

/// Requests are normalised before they are sent: duplicates merge to the
/// stronger mode, items of one mode on one branch collapse to the
/// ancestor, items of different modes on one branch are invalid input.
pub async fn requests_are_normalised_before_the_store(ctx: Ctx) {
    let gated = Gated::new(ctx.client().await);
    let client: Arc<dyn LockBackend> = gated.clone();
    let items = |asked: Asked<'_>| -> Result<LockItems, Error> {
        TreeLock::many(client.clone(), asked.iter().map(|&(at, mode)| (path(at), mode)))
            .map(|lock| lock.items().clone())
    };
    let expect = |asked: Asked<'_>| -> LockItems {
        LockItems::new(asked.iter().map(|&(at, mode)| (path(at), mode))).expect("valid")
    };
    let calls = gated.calls();
    assert_eq!(items(&[("A", Shared), ("A", Exclusive)]).expect("valid"), expect(&[("A", Exclusive)]));
    assert_eq!(items(&[("A", Shared), ("A", Shared)]).expect("valid"), expect(&[("A", Shared)]));
    assert_eq!(items(&[("A/B/C", Shared), ("A", Shared), ("A/D", Shared)]).expect("valid"), expect(&[("A", Shared)]));
    let collapsed = items(&[("B", Shared), ("A/B/C", Exclusive), ("A", Exclusive), ("AB", Shared)]).expect("valid");
    let in_order: Vec<(String, Mode)> = collapsed.iter().map(|item| (item.path.to_string(), item.mode)).collect();
    let mut sorted = in_order.clone();
    sorted.sort_by(|a, b| path(&a.0).key().cmp(path(&b.0).key()));
    assert_eq!(in_order, sorted, "in key order");
    assert_eq!(collapsed.len(), 3, "{collapsed:?}");
    assert!(collapsed.iter().any(|item| item.path == path("A") && item.mode == Exclusive));
    for bad in [
        &[("A", Shared), ("A/B", Exclusive)][..],
        &[("A/B", Shared), ("A", Exclusive)],
        &[("A", Shared), ("B", Shared), ("B/C/D", Exclusive)],
        &[],
    ] {
        match items(bad) {
            Err(Error::InvalidRequest { reason }) => assert!(!reason.is_empty()),
            other => panic!("{bad:?} should be invalid, got {other:?}"),
        }
    }
    assert_eq!(gated.calls(), calls, "normalisation sent something");

    // A duplicate merged and a branch collapsed to one Exclusive item is
    // granted on every algorithm, as that one item.
    let lock = TreeLock::many(client.clone(), [(path("X/Y"), Exclusive), (path("X"), Exclusive), (path("X"), Shared)])
        .expect("valid");
    let grant = lock.try_acquire().await.expect("free");
    assert_eq!(grant.items, LockItems::one(path("X"), Exclusive));
    assert_eq!(listed(&client, None).await, [("X".to_owned(), Exclusive, grant.token)]);
    lock.release().await.expect("release");
}

/// At most 16 items: 17 are refused before anything is sent; 16 at the
/// deepest level are granted in one grant, or refused whole by a store
/// that cannot take so large a request in one step (etcd's limit of
/// operations per transaction), which then holds nothing.
pub async fn sixteen_deep_items_or_a_typed_refusal(ctx: Ctx) {
    let gated = Gated::new(ctx.client().await);
    let client: Arc<dyn LockBackend> = gated.clone();
    let deep = |root: usize| -> LockPath {
        let mut segments = vec![format!("r{root}")];
        segments.extend((1..mutextree_core::MAX_DEPTH).map(|level| format!("d{level}")));
        LockPath::new(segments).expect("path")
    };
    let mode = |root: usize| if root.is_multiple_of(2) { Exclusive } else { Shared };
    let calls = gated.calls();
    match TreeLock::many(client.clone(), (0..=LockItems::MAX).map(|root| (deep(root), mode(root)))) {
        Err(Error::InvalidRequest { reason }) => assert!(reason.contains("16"), "{reason}"),
        other => panic!("17 items should be invalid, got {other:?}"),
    }
    assert_eq!(gated.calls(), calls, "an invalid request was sent");

    let sixteen =
        TreeLockBuilder::<TreeLock>::many(client.clone(), (0..LockItems::MAX).map(|root| (deep(root), mode(root))))
            .ttl(long(&ctx))
            .build()
            .expect("16 items are valid");
    match sixteen.try_acquire().await {
        Ok(grant) => {
            let seen = client.list(None).await.expect("list");
            assert_eq!(seen.len(), LockItems::MAX, "{seen:?}");
            assert!(seen
                .iter()
                .all(|item| item.token == grant.token && item.path.depth() == mutextree_core::MAX_DEPTH));
            let probe = handle_of(&ctx, &client, &[("r1", Exclusive)]);
            assert!(matches!(probe.try_acquire().await, Err(Error::Refused { .. })), "r1's deep Shared item holds");
            sixteen.release().await.expect("release");
        }
        Err(Error::Unsupported { reason, .. }) => assert!(!reason.is_empty()),
        Err(other) => panic!("16 items are granted or unsupported, got {other:?}"),
    }
    assert!(client.list(None).await.expect("list").is_empty(), "nothing left held");
}
