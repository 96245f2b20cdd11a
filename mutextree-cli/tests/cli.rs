//! The built `mutextree` binary, end to end, against a real Redis server
//! (and the memory store where one process is enough).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::servers;
use mutextree::{blocking, LockBackend};

/// A fresh namespace on the shared Redis test server: `(url, namespace)`.
fn store() -> (String, String) {
    (servers::redis::url(), namespace())
}

/// A fresh namespace on each store's test server.
fn every_store() -> Vec<(String, String)> {
    vec![store(), (servers::postgres::url(), namespace()), (servers::etcd::connect_url(), namespace())]
}

fn namespace() -> String {
    format!("cli-{:016x}", fastrand::u64(..))
}

fn mutextree(store: &(String, String)) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mutextree"));
    // No terminal: signals the tests send are theirs, not a terminal's.
    command
        .env("MUTEXTREE_STORE", &store.0)
        .env("MUTEXTREE_NAMESPACE", &store.1)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    command
}

/// Starts `mutextree run ... -- sh -c SCRIPT`, where SCRIPT prints its pid
/// (`echo $$`) once it is ready, and returns then, with that pid.
fn start_run(store: &(String, String), options: &[&str], path: &str, script: &str) -> (Child, String) {
    let mut run = mutextree(store)
        .arg("run")
        .args(options)
        .args([path, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(run.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("the command's first line");
    assert!(!line.is_empty(), "the command never started");
    (run, line.trim().to_owned())
}

/// `status` finds no lock in the store's namespace.
fn assert_nothing_held(store: &(String, String)) {
    let status = output(mutextree(store).arg("status"));
    let expected = format!("no locks held in namespace {}\n", store.1);
    assert_eq!(text(&status.stdout), expected, "all released on {}", store.0);
}

fn output(command: &mut Command) -> Output {
    command.output().expect("the mutextree binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The same namespace through the library, to hold locks in the way.
fn library(store: &(String, String)) -> Arc<dyn LockBackend> {
    blocking::connect_with(&store.0, &store.1).expect("connect")
}

fn scratch() -> PathBuf {
    conformance::harness::temp_dir("cli").expect("a temporary directory")
}

#[test]
fn overlapping_runs_exclude_each_other_on_every_store() {
    for store in every_store() {
        overlapping_runs_exclude_each_other(&store);
    }
}

fn overlapping_runs_exclude_each_other(store: &(String, String)) {
    let dir = scratch();
    let log = dir.join("log");
    let work = format!("echo start >> {log}; sleep 0.2; echo end >> {log}", log = log.display());
    let runs: Vec<Child> = ["A", "A/B", "A", "A/B/C"]
        .iter()
        .map(|path| {
            mutextree(store).args(["run", "--timeout", "60s", path, "--", "sh", "-c", &work]).spawn().expect("spawn")
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().expect("wait").success());
    }
    let lines = std::fs::read_to_string(&log).expect("log");
    assert_eq!(lines, "start\nend\n".repeat(4), "the commands never overlapped on {}", store.0);
    assert_nothing_held(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn siblings_run_at_the_same_time_on_every_store() {
    for store in every_store() {
        siblings_run_at_the_same_time(&store);
    }
}

fn siblings_run_at_the_same_time(store: &(String, String)) {
    let dir = scratch();
    // Each command marks that it started, then waits for the other's mark:
    // both finish only if they ran at the same time.
    let meet = |mine: &str, other: &str| {
        format!(
            "touch {dir}/{mine}; i=0; while [ ! -e {dir}/{other} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done",
            dir = dir.display()
        )
    };
    let one = mutextree(store).args(["run", "dc/rack/host-1", "--", "sh", "-c", &meet("one", "two")]).spawn();
    let two = mutextree(store).args(["run", "dc/rack/host-2", "--", "sh", "-c", &meet("two", "one")]).spawn();
    assert!(one.expect("spawn").wait().expect("wait").success());
    assert!(two.expect("spawn").wait().expect("wait").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_run_frees_its_lock_at_the_ttl_on_every_store() {
    for store in every_store() {
        a_killed_run_frees_its_lock_at_the_ttl(&store);
    }
}

fn a_killed_run_frees_its_lock_at_the_ttl(store: &(String, String)) {
    let (mut run, command_pid) = start_run(store, &["--ttl", "2s"], "X", "echo $$; exec sleep 60");
    run.kill().expect("SIGKILL mutextree");
    run.wait().expect("wait");
    let killed = Instant::now();
    // The command goes on without it (documented); stop it here.
    let _ = Command::new("kill").args(["-9", &command_pid]).status();

    let blocked = output(mutextree(store).args(["run", "--no-wait", "X", "--", "true"]));
    assert_eq!(blocked.status.code(), Some(3), "still held right after the kill: {}", text(&blocked.stderr));
    let freed = output(mutextree(store).args(["run", "--timeout", "10s", "X", "--", "true"]));
    assert!(freed.status.success(), "{}", text(&freed.stderr));
    // The ttl, plus what a store needs to notice (etcd revokes expired
    // leases every half second or so).
    assert!(killed.elapsed() < Duration::from_secs(8), "freed at its ttl on {}: {:?}", store.0, killed.elapsed());
}

#[test]
fn a_killed_waiter_stops_blocking_within_its_reservation_ttl_on_every_store() {
    for store in every_store() {
        a_killed_waiter_stops_blocking_within_its_reservation_ttl(&store);
    }
}

fn a_killed_waiter_stops_blocking_within_its_reservation_ttl(store: &(String, String)) {
    let backend = library(store);
    let holder = blocking::TreeLock::new(backend, "Q").expect("lock");
    let held = holder.lock().expect("free");
    // A waiting run says, with --verbose, what it queued behind: by then
    // its reservation is written.
    let mut waiter = mutextree(store)
        .args(["run", "-v", "--owner", "doomed-waiter", "Q", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Its own line comes among the library's events (-v prints both).
    let stderr = BufReader::new(waiter.stderr.take().expect("stderr"));
    let mut lines = stderr.lines().map(|line| line.expect("stderr text"));
    let line = lines.by_ref().take(50).find(|line| line.starts_with("mutextree: waiting for"));
    assert!(line.as_ref().is_some_and(|line| line.contains("waiting for Q behind Q")), "{line:?}");
    // Keep reading, so that the waiter never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));

    let status = text(&output(mutextree(store).arg("status")).stdout);
    assert!(status.contains("waiters, first in line first:\n  ticket "), "{status}");
    assert!(status.contains("owner \"doomed-waiter\" waiting since "), "{status}");
    let why = output(mutextree(store).args(["why", "Q/x"]));
    assert_eq!(why.status.code(), Some(3));
    assert!(
        text(&why.stdout).contains("Q (an ancestor): awaited exclusively by \"doomed-waiter\""),
        "{}",
        text(&why.stdout)
    );

    waiter.kill().expect("SIGKILL mutextree");
    waiter.wait().expect("wait");
    let killed = Instant::now();
    held.release().expect("the holder releases");
    // The dead waiter's place in the queue outlives it for a moment: a
    // request that does not wait comes after it...
    let refused = output(mutextree(store).args(["run", "--no-wait", "Q/x", "--", "true"]));
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("doomed-waiter"), "{}", text(&refused.stderr));
    // ...until its reservation lapses, unrenewed.
    let granted = output(mutextree(store).args(["run", "--timeout", "20s", "Q/x", "--", "true"]));
    assert!(granted.status.success(), "{}", text(&granted.stderr));
    let lapsed = killed.elapsed();
    // The reservation's ttl, plus what a store needs to notice (etcd
    // revokes expired leases every half second or so).
    let limit = mutextree::backend::RESERVATION_TTL + Duration::from_secs(2);
    assert!(lapsed < limit, "the dead waiter blocked for {lapsed:?} on {}", store.0);
    assert_nothing_held(store);
}

#[test]
fn status_draws_the_tree_and_why_names_the_blocker_on_every_store() {
    for store in every_store() {
        status_draws_the_tree_and_why_names_the_blocker(&store);
    }
}

fn status_draws_the_tree_and_why_names_the_blocker(store: &(String, String)) {
    let backend = library(store);
    let rack = blocking::TreeLock::new(backend.clone(), "eu/rack-1").expect("lock");
    let host = blocking::TreeLock::new(backend, "eu/rack-2/host-7").expect("lock");
    let _rack = rack.lock().expect("free");
    let _host = host.lock().expect("free");

    let status = output(mutextree(store).arg("status"));
    assert!(status.status.success());
    let drawn = text(&status.stdout);
    let lines: Vec<&str> = drawn.lines().collect();
    assert_eq!(lines[0], format!("namespace {}", store.1));
    assert_eq!(lines[1], "└── eu");
    assert!(
        lines[2].starts_with("    ├── rack-1  [held exclusively by ") && lines[2].contains("fencing token"),
        "{drawn}"
    );
    assert_eq!(lines[3], "    └── rack-2");
    assert!(lines[4].starts_with("        └── host-7  [held exclusively by "), "{drawn}");

    let json = output(mutextree(store).args(["status", "eu/rack-2", "--json"]));
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(parsed.as_array().map(Vec::len), Some(1));
    assert_eq!(parsed[0]["path"], "eu/rack-2/host-7");
    assert_eq!(parsed[0]["mode"], "exclusive");
    assert_eq!(parsed[0]["token"], host.as_async().grant().expect("held").token);

    let why = output(mutextree(store).args(["why", "eu/rack-2"]));
    assert_eq!(why.status.code(), Some(3));
    assert!(
        text(&why.stdout).contains("eu/rack-2/host-7 (a descendant): held exclusively by"),
        "{}",
        text(&why.stdout)
    );
    let above = output(mutextree(store).args(["why", "eu/rack-1/host-1"]));
    assert_eq!(above.status.code(), Some(3));
    assert!(text(&above.stdout).contains("eu/rack-1 (an ancestor): held exclusively by"), "{}", text(&above.stdout));
    let free = output(mutextree(store).args(["why", "eu/rack-3"]));
    assert_eq!(free.status.code(), Some(0));
    assert!(text(&free.stdout).contains("is free"));
}

#[test]
fn a_run_of_several_paths_holds_them_all_as_one_grant_on_every_store() {
    for store in every_store() {
        a_run_of_several_paths_holds_them_all_as_one_grant(&store);
    }
}

fn a_run_of_several_paths_holds_them_all_as_one_grant(store: &(String, String)) {
    let (holder, command_pid) =
        start_run(store, &["--owner", "mover", "--shared", "C/D"], "A/B", "echo $$; exec sleep 60");

    let json = output(mutextree(store).args(["status", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 2, "both paths are held on {}: {listed:?}", store.0);
    assert_eq!((&listed[0]["path"], &listed[0]["mode"]), (&"A/B".into(), &"exclusive".into()));
    assert_eq!((&listed[1]["path"], &listed[1]["mode"]), (&"C/D".into(), &"shared".into()));
    let token = listed[0]["token"].as_u64().expect("a token");
    assert_eq!(listed[1]["token"], token, "one grant, one token");

    let status = text(&output(mutextree(store).arg("status")).stdout);
    assert!(status.contains("B  [held exclusively by \"mover\""), "{status}");
    assert!(status.contains("D  [held shared by \"mover\""), "{status}");
    assert!(
        status.ends_with(&format!("grants of several paths:\n  token {token} owner \"mover\": A/B, C/D (shared)\n")),
        "the grant's paths shown together on {}: {status}",
        store.0
    );

    // Shared coexists with shared, on the path, an ancestor or a
    // descendant; exclusive is refused on every one of them.
    for shared in ["C/D", "C", "C/D/e"] {
        let joined = output(mutextree(store).args(["run", "-n", "-s", shared, "--", "true"]));
        assert!(joined.status.success(), "shared {shared} beside shared C/D on {}: {}", store.0, text(&joined.stderr));
    }
    for exclusive in ["C/D", "C", "C/D/e"] {
        let refused = output(mutextree(store).args(["run", "-n", exclusive, "--", "true"]));
        assert_eq!(refused.status.code(), Some(3), "exclusive {exclusive} on {}: {}", store.0, text(&refused.stderr));
        let message = text(&refused.stderr);
        assert!(message.contains("shared by \"mover\""), "names the shared holder: {message}");
    }
    let refused = output(mutextree(store).args(["run", "-n", "-s", "A/B", "--", "true"]));
    assert_eq!(refused.status.code(), Some(3), "shared under exclusive on {}", store.0);

    // A refusal of several paths names a lock in the way of each, and
    // takes none of the free ones.
    let both = output(mutextree(store).args(["run", "-n", "-E", "75", "A/B/x", "C/D", "F", "--", "true"]));
    assert_eq!(both.status.code(), Some(75), "{}", text(&both.stderr));
    let message = text(&both.stderr);
    assert!(message.contains("A/B/x: its ancestor A/B is held by \"mover\""), "{message}");
    assert!(message.contains("C/D: it is held shared by \"mover\""), "{message}");
    assert_eq!(output(mutextree(store).args(["why", "F"])).status.code(), Some(0), "nothing half-granted");

    assert!(Command::new("kill").arg(&command_pid).status().expect("kill").success());
    let finished = holder.wait_with_output().expect("wait");
    assert_eq!(finished.status.code(), Some(128 + 15), "the command's end: {}", text(&finished.stderr));
    assert_nothing_held(store);
}

#[test]
fn the_command_finds_every_path_and_mode_in_its_environment() {
    let memory = ("memory://".to_owned(), "cli".to_owned());
    let script = "printf '%s %s\\n%s\\n' \"$MUTEXTREE_PATH\" \"$MUTEXTREE_MODE\" \"$MUTEXTREE_ITEMS\"";
    let ran = output(mutextree(&memory).args(["run", "-s", "x/y", "a\\/b", "--", "sh", "-c", script]));
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    let out = text(&ran.stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("a\\/b exclusive"), "the first path in key order: {out}");
    let items: serde_json::Value = serde_json::from_str(lines.next().expect("a second line")).expect("JSON");
    assert_eq!(items, serde_json::json!([{"path": "a\\/b", "mode": "exclusive"}, {"path": "x/y", "mode": "shared"}]));
}

#[test]
fn why_lists_every_holder_in_the_way() {
    let store = store();
    let backend = library(&store);
    let readers: Vec<blocking::TreeLock> = [("eu", "reader-1"), ("eu", "reader-2"), ("eu/rack-1", "reader-3")]
        .iter()
        .map(|(path, owner)| {
            let reader =
                blocking::TreeLock::builder(backend.clone(), *path).shared().owner(*owner).build().expect("lock");
            reader.acquire().expect("readers share");
            reader
        })
        .collect();
    let sibling =
        blocking::TreeLock::builder(backend, "eu/rack-2/host-1").shared().owner("reader-4").build().expect("lock");
    sibling.acquire().expect("readers share");

    let why = output(mutextree(&store).args(["why", "eu/rack-1/host-9"]));
    assert_eq!(why.status.code(), Some(3));
    let said = text(&why.stdout);
    assert!(said.starts_with("an exclusive lock on eu/rack-1/host-9 is blocked by 3 locks:\n"), "{said}");
    for reader in ["reader-1", "reader-2", "reader-3"] {
        assert!(said.contains(&format!("held shared by \"{reader}\"")), "every shared holder: {said}");
    }
    assert!(!said.contains("reader-4"), "a sibling's reader is not in the way: {said}");

    let json = output(mutextree(&store).args(["why", "eu", "--json"]));
    assert_eq!(json.status.code(), Some(3));
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(answer["mode"], "exclusive");
    let mut owners: Vec<&str> =
        answer["blockers"].as_array().expect("blockers").iter().filter_map(|b| b["owner"].as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["reader-1", "reader-2", "reader-3", "reader-4"], "{answer}");

    let shared = output(mutextree(&store).args(["why", "--shared", "eu/rack-1/host-9"]));
    assert_eq!(shared.status.code(), Some(0), "{}", text(&shared.stdout));
    let said = text(&shared.stdout);
    assert!(said.starts_with("eu/rack-1/host-9 is free: a shared lock on it would be granted now\n"), "{said}");
    assert!(said.contains("(3 shared locks on its branch would not be in the way)"), "{said}");
    drop((readers, sibling));
}

#[test]
fn release_force_of_a_multi_path_grant_frees_every_path_on_every_store() {
    for store in every_store() {
        release_force_of_a_multi_path_grant_frees_every_path(&store);
    }
}

fn release_force_of_a_multi_path_grant_frees_every_path(store: &(String, String)) {
    let other = blocking::TreeLock::builder(library(store), "R/b").owner("bystander").build().expect("lock");
    other.acquire().expect("free");
    let (run, _) = start_run(
        store,
        &["--owner", "mover", "-s", "S/x", "--ttl", "3s", "--kill-after", "5s"],
        "R/a",
        "echo $$; exec sleep 60",
    );
    let released = output(mutextree(store).args(["release", "--force", "--yes", "S/x"]));
    assert!(released.status.success(), "{}", text(&released.stderr));
    let said = text(&released.stdout);
    assert!(said.contains("released R/a, S/x (shared) (owner \"mover\", token "), "both paths of the grant: {said}");

    let finished = run.wait_with_output().expect("wait");
    assert_eq!(
        finished.status.code(),
        Some(5),
        "the holder learns its loss on {}: {}",
        store.0,
        text(&finished.stderr)
    );
    let json = output(mutextree(store).args(["status", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let paths: Vec<&str> = listed.as_array().expect("array").iter().filter_map(|lock| lock["path"].as_str()).collect();
    assert_eq!(paths, ["R/b"], "every path of the grant is free, the other lock stays, on {}", store.0);
    other.release().expect("still held");
}

#[test]
fn paths_that_cannot_be_held_together_are_refused_before_the_store_is_contacted() {
    // Nothing listens there: a store contacted would fail with status 1.
    let nowhere = ("redis://127.0.0.1:1/?connect_timeout=300ms".to_owned(), "cli".to_owned());
    let branch = output(mutextree(&nowhere).args(["run", "A", "--shared", "A/B", "--", "true"]));
    assert_eq!(branch.status.code(), Some(2), "{}", text(&branch.stderr));
    let message = text(&branch.stderr);
    assert!(message.contains("invalid lock request: A (exclusive) and A/B (shared) are on one branch"), "{message}");

    let paths: Vec<String> = (0..17).map(|n| format!("dc/host-{n}")).collect();
    let many = output(mutextree(&nowhere).arg("run").args(&paths).args(["--", "true"]));
    assert_eq!(many.status.code(), Some(2), "{}", text(&many.stderr));
    assert!(text(&many.stderr).contains("17 paths, but one request may lock at most 16"), "{}", text(&many.stderr));

    let sixteen = output(mutextree(&nowhere).arg("run").args(&paths[..16]).args(["--", "true"]));
    assert_eq!(sixteen.status.code(), Some(1), "16 paths are fine, and the store is tried: {}", text(&sixteen.stderr));
}

#[test]
fn exit_statuses_are_as_documented() {
    let store = store();
    let held: blocking::TreeLock =
        mutextree::TreeLock::builder(library(&store), "A").owner("admin-7").build().expect("lock").into();
    let _guard = held.lock().expect("free");

    let refused = output(mutextree(&store).args(["run", "--no-wait", "A/B", "--", "true"]));
    assert_eq!(refused.status.code(), Some(3));
    let message = text(&refused.stderr);
    assert!(message.contains("admin-7") && message.lines().count() == 1, "one line naming the holder: {message}");

    let timed_out = output(mutextree(&store).args(["run", "--timeout", "300ms", "A", "--", "true"]));
    assert_eq!(timed_out.status.code(), Some(4), "{}", text(&timed_out.stderr));

    let own_status = output(mutextree(&store).args(["run", "B", "--", "sh", "-c", "exit 7"]));
    assert_eq!(own_status.status.code(), Some(7));
    let not_found = output(mutextree(&store).args(["run", "B", "--", "/nonexistent/command"]));
    assert_eq!(not_found.status.code(), Some(127));
    let not_executable = output(mutextree(&store).args(["run", "B", "--", "/etc/hostname"]));
    assert_eq!(not_executable.status.code(), Some(126));
    let bad_path = output(mutextree(&store).args(["run", "B//C", "--", "true"]));
    assert_eq!(bad_path.status.code(), Some(2), "{}", text(&bad_path.stderr));
    let bad_ttl = output(mutextree(&store).args(["run", "--ttl", "0s", "B", "--", "true"]));
    assert_eq!(bad_ttl.status.code(), Some(2), "{}", text(&bad_ttl.stderr));
    let no_store = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).env_remove("MUTEXTREE_STORE").args(["status"]));
    assert_eq!(no_store.status.code(), Some(2));
    assert!(text(&no_store.stderr).contains("--store"));
    let down = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).args([
        "--store",
        "redis://127.0.0.1:1/?connect_timeout=300ms",
        "status",
    ]));
    assert_eq!(down.status.code(), Some(1), "{}", text(&down.stderr));
}

#[test]
fn a_lock_lost_while_the_command_runs_stops_it() {
    let store = store();
    let (run, command_pid) = start_run(&store, &["--ttl", "3s", "--kill-after", "5s"], "L", "echo $$; exec sleep 60");
    let released = output(mutextree(&store).args(["release", "--force", "--yes", "L"]));
    assert!(released.status.success(), "{}", text(&released.stderr));
    assert!(text(&released.stdout).contains("released L"), "{}", text(&released.stdout));
    let finished = run.wait_with_output().expect("wait");
    assert_eq!(finished.status.code(), Some(5), "{}", text(&finished.stderr));
    assert!(text(&finished.stderr).contains("was lost"), "{}", text(&finished.stderr));
    let alive = Command::new("kill").args(["-0", &command_pid]).stderr(Stdio::null()).status().expect("kill -0");
    assert!(!alive.success(), "the command was stopped");

    let without_force = output(mutextree(&store).args(["release", "L"]));
    assert_eq!(without_force.status.code(), Some(2));
}

/// A run holding a lock with a 5-minute ttl (its first refresh 100 s
/// away) hears a forced release at once: it stops its command within
/// seconds, says why and exits 5.
#[test]
fn a_forced_release_stops_a_run_at_once_on_every_store() {
    for store in every_store() {
        a_forced_release_stops_a_run_at_once(&store);
    }
}

fn a_forced_release_stops_a_run_at_once(store: &(String, String)) {
    let (run, command_pid) = start_run(store, &["--ttl", "5m", "--kill-after", "5s"], "F", "echo $$; exec sleep 600");
    let forced_at = Instant::now();
    let released = output(mutextree(store).args(["release", "--force", "--yes", "F"]));
    assert!(released.status.success(), "{}: {}", store.0, text(&released.stderr));
    let finished = run.wait_with_output().expect("wait");
    let stopped_after = forced_at.elapsed();
    assert!(
        stopped_after < Duration::from_secs(10),
        "stopped {stopped_after:?} after the forced release on {}",
        store.0
    );
    assert_eq!(finished.status.code(), Some(5), "{}: {}", store.0, text(&finished.stderr));
    assert!(text(&finished.stderr).contains("forcibly released"), "{}: {}", store.0, text(&finished.stderr));
    let alive = Command::new("kill").args(["-0", &command_pid]).stderr(Stdio::null()).status().expect("kill -0");
    assert!(!alive.success(), "the command was stopped on {}", store.0);
    assert_nothing_held(store);
}

/// A holder stopped (`SIGSTOP`) past its ttl, as a paused process: the lock
/// goes to another client with a higher token; when the holder resumes, it
/// learns of the loss at its next refresh, stops its command and exits 5,
/// and the new holder keeps the lock.
#[test]
fn a_holder_stopped_past_its_ttl_learns_its_loss_when_it_resumes_on_every_store() {
    for store in every_store() {
        a_holder_stopped_past_its_ttl_learns_its_loss_when_it_resumes(&store);
    }
}

fn a_holder_stopped_past_its_ttl_learns_its_loss_when_it_resumes(store: &(String, String)) {
    let (run, command_pid) = start_run(store, &["--ttl", "2s", "--kill-after", "5s"], "P", "echo $$; exec sleep 60");
    let other = blocking::TreeLock::new(library(store), "P").expect("lock");
    let backend = other.as_async().backend().clone();
    let held_by_run = blocking_list(&backend, "P");
    let pid = run.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());

    let taken = other.acquire_timeout(Duration::from_secs(15)).expect("free once the stopped holder's ttl passed");
    assert!(taken.token > held_by_run, "token {} after {held_by_run} on {}", taken.token, store.0);
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    let finished = run.wait_with_output().expect("wait");
    assert_eq!(finished.status.code(), Some(5), "{}: {}", store.0, text(&finished.stderr));
    assert!(text(&finished.stderr).contains("was lost"), "{}", text(&finished.stderr));
    let alive = Command::new("kill").args(["-0", &command_pid]).stderr(Stdio::null()).status().expect("kill -0");
    assert!(!alive.success(), "the command was stopped");
    assert_eq!(blocking_list(&backend, "P"), taken.token, "the new holder keeps the lock on {}", store.0);
    other.release().expect("the new holder releases");
}

/// The token of the one lock held on `path`.
fn blocking_list(backend: &Arc<dyn LockBackend>, path: &str) -> u64 {
    let path = mutextree::LockPath::parse(path).expect("path");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let held = runtime.block_on(backend.list(Some(&path))).expect("list");
    assert_eq!(held.len(), 1, "{held:?}");
    held[0].token
}

#[test]
fn release_asks_first_and_goes_down_the_tree_when_told() {
    let store = store();
    let backend = library(&store);
    let leaves: Vec<blocking::TreeLock> =
        ["R/a", "R/b/c"].iter().map(|path| blocking::TreeLock::new(backend.clone(), *path).expect("lock")).collect();
    for leaf in &leaves {
        leaf.acquire().expect("free");
    }
    let no_terminal = output(mutextree(&store).args(["release", "--force", "--recursive", "R"]));
    assert_eq!(no_terminal.status.code(), Some(2), "no confirmation without a terminal or --yes");
    assert!(text(&no_terminal.stderr).contains("--yes"), "{}", text(&no_terminal.stderr));
    let not_recursive = output(mutextree(&store).args(["release", "--force", "--yes", "R"]));
    assert_eq!(not_recursive.status.code(), Some(1));
    assert!(text(&not_recursive.stderr).contains("2 under it"), "{}", text(&not_recursive.stderr));
    let recursive = output(mutextree(&store).args(["release", "--force", "--yes", "--recursive", "R"]));
    assert!(recursive.status.success());
    assert_eq!(text(&recursive.stdout).matches("released ").count(), 2, "{}", text(&recursive.stdout));
    for leaf in &leaves {
        assert!(matches!(leaf.release(), Err(mutextree::Error::NotHeld { .. })), "released by the administrator");
    }
}

#[test]
fn signals_reach_the_command() {
    let store = store();
    for (signal, number) in [("TERM", 15), ("INT", 2), ("HUP", 1)] {
        // The trap first: a signal sent once the pid is printed finds it.
        let script = format!("trap 'echo got {signal}; exit 9' {signal}; echo $$; while :; do sleep 0.05; done");
        let (run, _) = start_run(&store, &[], "S", &script);
        let sent = Command::new("kill").args([&format!("-{signal}"), &run.id().to_string()]).status().expect("kill");
        assert!(sent.success());
        let finished = run.wait_with_output().expect("wait");
        assert_eq!(finished.status.code(), Some(9), "SIG{signal} ({number}) reached the command, which exited 9");
        assert_eq!(text(&finished.stdout).lines().last(), Some(&*format!("got {signal}")));
        let free = output(mutextree(&store).args(["why", "S"]));
        assert_eq!(free.status.code(), Some(0), "released at the end");
    }
    // A command a signal ends: 128 + its number, as shells say.
    let killed = output(mutextree(&store).args(["run", "S", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(killed.status.code(), Some(128 + 9));
}

#[test]
fn the_memory_store_serves_one_process() {
    let memory = ("memory://".to_owned(), "cli".to_owned());
    let run = output(mutextree(&memory).args([
        "run",
        "A",
        "--",
        "sh",
        "-c",
        "echo token=$MUTEXTREE_TOKEN path=$MUTEXTREE_PATH",
    ]));
    assert!(run.status.success());
    assert_eq!(text(&run.stdout), "token=1 path=A\n");
    assert!(text(&run.stderr).contains("this process only"), "{}", text(&run.stderr));
    let bench =
        output(mutextree(&memory).args(["bench", "--clients", "4", "--duration", "300ms", "--scenario", "contended"]));
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let table = text(&bench.stdout);
    assert!(table.contains("| clients | depth |") && table.contains("| 4 | 3 | contended |"), "{table}");
}

#[test]
fn bench_counts_round_trips_on_redis() {
    let store = store();
    // A grant of two paths, and a shared one, is one script too.
    for (scenario, clients) in [("siblings", "1"), ("two-paths", "1"), ("read-heavy", "2")] {
        let bench = output(mutextree(&store).args([
            "bench",
            "--duration",
            "300ms",
            "--background",
            "1000",
            "--scenario",
            scenario,
            "--clients",
            clients,
        ]));
        assert!(bench.status.success(), "{scenario}: {}", text(&bench.stderr));
        let out = text(&bench.stdout);
        let per_pair: f64 = out
            .lines()
            .find_map(|line| line.strip_prefix("round trips per pair: "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no round trips in {out}"));
        // Two scripts a pair; loading the library adds two requests once
        // per server start.
        assert!((2.0..2.05).contains(&per_pair), "{scenario}: {out}");
    }
}

#[test]
fn every_subcommand_help_has_an_example() {
    for subcommand in ["run", "status", "why", "release", "bench"] {
        let help = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).args([subcommand, "--help"]));
        assert!(help.status.success());
        assert!(text(&help.stdout).contains("mutextree "), "{subcommand} --help has no example");
    }
}
