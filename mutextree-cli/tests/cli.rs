//! The built `mutextree` binary, end to end, against a real Redis server
//! (and the memory store where one process is enough).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mutextree::{blocking, LockBackend};

/// A fresh namespace on the shared test server: `(url, namespace)`.
fn store() -> (String, String) {
    (conformance::servers::redis_url(), format!("cli-{:016x}", fastrand::u64(..)))
}

fn mutextree(store: &(String, String)) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mutextree"));
    command.env("MUTEXTREE_STORE", &store.0).env("MUTEXTREE_NAMESPACE", &store.1).env_remove("RUST_BACKTRACE");
    command
}

fn output(command: &mut Command) -> Output {
    command.output().expect("the mutextree binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The same namespace through the library, to hold locks in the way.
fn library(store: &(String, String)) -> Arc<dyn LockBackend> {
    blocking::connect(&format!("{}?namespace={}", store.0, store.1)).expect("connect")
}

fn scratch() -> PathBuf {
    conformance::harness::temp_dir("cli").expect("a temporary directory")
}

/// Waits for a file a command creates when it has started: the event the
/// test needs, seen the only way a file system offers.
fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn overlapping_runs_exclude_each_other() {
    let store = store();
    let dir = scratch();
    let log = dir.join("log");
    let work = format!("echo start >> {log}; sleep 0.2; echo end >> {log}", log = log.display());
    let runs: Vec<Child> = ["A", "A/B", "A", "A/B/C"]
        .iter()
        .map(|path| {
            mutextree(&store).args(["run", "--timeout", "60s", path, "--", "sh", "-c", &work]).spawn().expect("spawn")
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().expect("wait").success());
    }
    let lines = std::fs::read_to_string(&log).expect("log");
    assert_eq!(lines, "start\nend\n".repeat(4), "the commands never overlapped");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn siblings_run_at_the_same_time() {
    let store = store();
    let dir = scratch();
    // Each command marks that it started, then waits for the other's mark:
    // both finish only if they ran at the same time.
    let meet = |mine: &str, other: &str| {
        format!(
            "touch {dir}/{mine}; i=0; while [ ! -e {dir}/{other} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done",
            dir = dir.display()
        )
    };
    let one = mutextree(&store).args(["run", "dc/rack/host-1", "--", "sh", "-c", &meet("one", "two")]).spawn();
    let two = mutextree(&store).args(["run", "dc/rack/host-2", "--", "sh", "-c", &meet("two", "one")]).spawn();
    assert!(one.expect("spawn").wait().expect("wait").success());
    assert!(two.expect("spawn").wait().expect("wait").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_run_frees_its_lock_at_the_ttl() {
    let store = store();
    let dir = scratch();
    let pid_file = dir.join("pid");
    let mut run = mutextree(&store)
        .args([
            "run",
            "--ttl",
            "2s",
            "X",
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        ])
        .spawn()
        .expect("spawn");
    wait_for_file(&pid_file);
    run.kill().expect("SIGKILL mutextree");
    run.wait().expect("wait");
    let killed = Instant::now();
    // The command goes on without it (documented); stop it here.
    let command_pid = std::fs::read_to_string(&pid_file).expect("pid").trim().to_owned();
    let _ = Command::new("kill").args(["-9", &command_pid]).status();

    let blocked = output(mutextree(&store).args(["run", "X", "--", "true"]));
    assert_eq!(blocked.status.code(), Some(3), "still held right after the kill: {}", text(&blocked.stderr));
    let freed = output(mutextree(&store).args(["run", "--timeout", "10s", "X", "--", "true"]));
    assert!(freed.status.success(), "{}", text(&freed.stderr));
    let waited = killed.elapsed();
    // Refreshed every third of the ttl, the lock had 2/3 to all of its 2 s
    // left when its holder died.
    assert!(waited >= Duration::from_millis(1000) && waited < Duration::from_secs(8), "freed after {waited:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_draws_the_tree_and_why_names_the_blocker() {
    let store = store();
    let backend = library(&store);
    let rack = blocking::TreeLock::new(backend.clone(), "eu/rack-1").expect("lock");
    let host = blocking::TreeLock::new(backend, "eu/rack-2/host-7").expect("lock");
    let _rack = rack.lock().expect("free");
    let _host = host.lock().expect("free");

    let status = output(mutextree(&store).arg("status"));
    assert!(status.status.success());
    let drawn = text(&status.stdout);
    let lines: Vec<&str> = drawn.lines().collect();
    assert_eq!(lines[0], "(namespace)");
    assert_eq!(lines[1], "└── eu");
    assert!(lines[2].starts_with("    ├── rack-1  [held by ") && lines[2].contains("fencing token"), "{drawn}");
    assert_eq!(lines[3], "    └── rack-2");
    assert!(lines[4].starts_with("        └── host-7  [held by "), "{drawn}");

    let json = output(mutextree(&store).args(["status", "eu/rack-2", "--json"]));
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(parsed.as_array().map(Vec::len), Some(1));
    assert_eq!(parsed[0]["path"], "eu/rack-2/host-7");
    assert_eq!(parsed[0]["token"], host.as_async().grant().expect("held").token);

    let why = output(mutextree(&store).args(["why", "eu/rack-2"]));
    assert_eq!(why.status.code(), Some(3));
    assert!(text(&why.stdout).contains("eu/rack-2/host-7 (a descendant): held by"), "{}", text(&why.stdout));
    let free = output(mutextree(&store).args(["why", "eu/rack-3"]));
    assert_eq!(free.status.code(), Some(0));
    assert!(text(&free.stdout).contains("is free"));
}

#[test]
fn exit_statuses_are_as_documented() {
    let store = store();
    let held: blocking::TreeLock =
        mutextree::TreeLock::builder(library(&store), "A").owner("admin-7").build().expect("lock").into();
    let _guard = held.lock().expect("free");

    let refused = output(mutextree(&store).args(["run", "A/B", "--", "true"]));
    assert_eq!(refused.status.code(), Some(3));
    let message = text(&refused.stderr);
    assert!(message.contains("admin-7") && message.lines().count() == 1, "one line naming the holder: {message}");

    let timed_out = output(mutextree(&store).args(["run", "--timeout", "300ms", "A", "--", "true"]));
    assert_eq!(timed_out.status.code(), Some(4), "{}", text(&timed_out.stderr));

    let own_status = output(mutextree(&store).args(["run", "B", "--", "sh", "-c", "exit 7"]));
    assert_eq!(own_status.status.code(), Some(7));
    let not_found = output(mutextree(&store).args(["run", "B", "--", "/nonexistent/command"]));
    assert_eq!(not_found.status.code(), Some(127));
    let bad_path = output(mutextree(&store).args(["run", "B//C", "--", "true"]));
    assert_eq!(bad_path.status.code(), Some(2), "{}", text(&bad_path.stderr));
    let bad_ttl = output(mutextree(&store).args(["run", "--ttl", "0s", "B", "--", "true"]));
    assert_eq!(bad_ttl.status.code(), Some(2), "{}", text(&bad_ttl.stderr));
    let no_store = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).env_remove("MUTEXTREE_STORE").args(["status"]));
    assert_eq!(no_store.status.code(), Some(2));
    assert!(text(&no_store.stderr).contains("--store"));
    let down = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).args([
        "--store",
        "redis://127.0.0.1:1/?connection_timeout=300ms",
        "status",
    ]));
    assert_eq!(down.status.code(), Some(1), "{}", text(&down.stderr));
}

#[test]
fn a_lock_lost_while_the_command_runs_stops_it() {
    let store = store();
    let dir = scratch();
    let started = dir.join("started");
    let run = mutextree(&store)
        .args(["run", "--ttl", "1s", "--kill-after", "5s", "L", "--", "sh", "-c"])
        .arg(format!("touch {}; exec sleep 60", started.display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for_file(&started);
    let released = output(mutextree(&store).args(["release", "--force", "--yes", "L"]));
    assert!(released.status.success(), "{}", text(&released.stderr));
    assert!(text(&released.stdout).contains("released L"));
    let finished = run.wait_with_output().expect("wait");
    assert_eq!(finished.status.code(), Some(5), "{}", text(&finished.stderr));
    assert!(text(&finished.stderr).contains("was lost"), "{}", text(&finished.stderr));

    let without_force = output(mutextree(&store).args(["release", "L"]));
    assert_eq!(without_force.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn signals_reach_the_command() {
    let store = store();
    let dir = scratch();
    let started = dir.join("started");
    let script = format!(
        "trap 'echo got >> {dir}/log; exit 9' TERM; touch {started}; while :; do sleep 0.05; done",
        dir = dir.display(),
        started = started.display()
    );
    let run = mutextree(&store).args(["run", "S", "--", "sh", "-c", &script]).spawn().expect("spawn");
    wait_for_file(&started);
    let status = Command::new("kill").args(["-TERM", &run.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let finished = run.wait_with_output().expect("wait");
    assert_eq!(finished.status.code(), Some(9), "the command's own status after SIGTERM");
    assert_eq!(std::fs::read_to_string(dir.join("log")).expect("log"), "got\n");
    let free = output(mutextree(&store).args(["why", "S"]));
    assert_eq!(free.status.code(), Some(0), "released at the end");
    let _ = std::fs::remove_dir_all(&dir);
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
    let bench = output(mutextree(&store).args(["bench", "--duration", "300ms", "--background", "1000"]));
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(text(&bench.stdout).contains("round trips per pair: 2.00"), "{}", text(&bench.stdout));
}

#[test]
fn every_subcommand_help_has_an_example() {
    for subcommand in ["run", "status", "why", "release", "bench"] {
        let help = output(Command::new(env!("CARGO_BIN_EXE_mutextree")).args([subcommand, "--help"]));
        assert!(help.status.success());
        assert!(text(&help.stdout).contains("mutextree "), "{subcommand} --help has no example");
    }
}
