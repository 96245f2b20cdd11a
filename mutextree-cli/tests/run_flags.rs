//! The command line as flock(1) users meet it: `run` waits by default,
//! `-n`, `-w`, `-E`, `-c` and `-v`, the waiting line on a terminal, and the
//! rest of the command line (`--json`, completions, the manual page, help
//! wrapped to the terminal).
//!
//! Two commands that must see each other's locks share the Redis test
//! server (`memory://` is one store per process); the rest uses the memory
//! store.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mutextree::blocking;

const BINARY: &str = env!("CARGO_BIN_EXE_mutextree");

/// A fresh namespace on the shared Redis test server: `(url, namespace)`.
fn redis() -> (String, String) {
    (conformance::servers::redis::url(), format!("flags-{:016x}", fastrand::u64(..)))
}

fn memory() -> (String, String) {
    ("memory://".to_owned(), "flags".to_owned())
}

fn mutextree(store: &(String, String)) -> Command {
    let mut command = Command::new(BINARY);
    command.env("MUTEXTREE_STORE", &store.0).env("MUTEXTREE_NAMESPACE", &store.1).stdin(Stdio::null());
    command
}

fn output(command: &mut Command) -> Output {
    command.output().expect("the mutextree binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A lock on `path` held through the library by `owner`, in the store's
/// namespace, until the returned handle is released or dropped.
fn hold(store: &(String, String), path: &str, owner: &str) -> blocking::TreeLock {
    let backend = blocking::connect_with(&store.0, &store.1).expect("connect");
    let lock = blocking::TreeLock::builder(backend, path).owner(owner).build().expect("a valid lock");
    lock.try_acquire().expect("free");
    lock
}

/// Starts `mutextree run` holding `path` until a line is written to its
/// standard input; returns once its command runs.
fn start_holder(store: &(String, String), path: &str, owner: &str) -> Child {
    let mut holder = mutextree(store)
        .args(["run", "--owner", owner, path, "-c", "echo holding; read line"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("the command's first line");
    assert_eq!(line, "holding\n", "the holder's command never started");
    holder
}

/// Lets a holder's command end.
fn finish_holder(mut holder: Child) {
    holder.stdin.take().expect("stdin").write_all(b"done\n").expect("write");
    assert!(holder.wait().expect("wait").success());
}

/// `script`'s argument: words quoted for `sh`.
fn shell_words(words: &[&str]) -> String {
    words.iter().map(|word| format!("'{}'", word.replace('\'', "'\\''"))).collect::<Vec<_>>().join(" ")
}

/// Runs `words` under a pseudo-terminal (script(1)) of `columns` columns,
/// with the terminal's output read as it comes through the returned
/// channel.
fn under_terminal(store: &(String, String), columns: u16, words: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let inner = format!("stty cols {columns} rows 40; exec {}", shell_words(words));
    let mut child = Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .env("MUTEXTREE_STORE", &store.0)
        .env("MUTEXTREE_NAMESPACE", &store.1)
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script(1) runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read @ 1..) = stdout.read(&mut buffer) {
            if sender.send(text(&buffer[..read])).is_err() {
                break;
            }
        }
    });
    (child, receiver)
}

/// Reads the terminal until `done` says its output so far is complete;
/// panics with what was read after 30 s.
fn read_until(receiver: &mpsc::Receiver<String>, seen: &mut String, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&chunk),
            Err(_) => panic!("not seen on the terminal within 30 s: {seen:?}"),
        }
    }
}

#[test]
fn a_second_run_waits_for_the_first_by_default_and_shows_what_blocks_it() {
    let store = redis();
    let holder = start_holder(&store, "A", "first-holder");
    let (mut waiter, terminal) = under_terminal(&store, 120, &[BINARY, "run", "-v", "A/B", "-c", "echo second ran"]);
    let mut seen = String::new();
    // The waiting line names the path waited for, how long the wait may
    // last, its place in the queue, the lock in the way and its owner.
    read_until(&terminal, &mut seen, |seen| {
        seen.contains(
            "waiting for A/B (no time limit, first in the queue): A (an ancestor) held exclusively by \"first-holder\" \
             for ",
        )
    });
    assert!(waiter.try_wait().expect("try_wait").is_none(), "the second run waits: {seen:?}");
    finish_holder(holder);
    read_until(&terminal, &mut seen, |seen| seen.contains("second ran"));
    assert!(waiter.wait().expect("wait").success(), "{seen:?}");
    assert!(seen.contains("granted after ") && seen.contains(", token "), "-v reports the grant: {seen:?}");
}

#[test]
fn the_waiting_line_counts_down_the_timeout() {
    let store = redis();
    let _held = hold(&store, "T", "admin-3");
    let (mut waiter, terminal) =
        under_terminal(&store, 120, &[BINARY, "run", "--timeout", "30", "-E", "75", "T", "--", "true"]);
    let mut seen = String::new();
    read_until(&terminal, &mut seen, |seen| {
        seen.contains("waiting for T (gives up in ")
            && seen.contains("): T (the path itself) held exclusively by \"admin-3\" for ")
    });
    waiter.kill().expect("stop the waiter");
    let _ = waiter.wait();
}

#[test]
fn no_wait_refuses_at_once_with_a_hint_and_the_conflict_exit_code() {
    let store = redis();
    let _held = hold(&store, "N", "admin-7");

    let refused = output(mutextree(&store).args(["run", "-n", "N/x", "--", "true"]));
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    let message = text(&refused.stderr);
    assert!(message.contains("admin-7"), "names the holder: {message}");
    assert!(message.contains("(use --timeout DURATION or drop --no-wait to wait)"), "hints how to wait: {message}");

    let chosen = output(mutextree(&store).args(["run", "--no-wait", "-E", "75", "N", "--", "true"]));
    assert_eq!(chosen.status.code(), Some(75), "{}", text(&chosen.stderr));

    let ran = output(mutextree(&store).args(["run", "-n", "other", "-c", "exit 3"]));
    assert_eq!(ran.status.code(), Some(3), "the command's own 3 is still its own");

    let both = output(mutextree(&store).args(["run", "-n", "--timeout", "5s", "N", "--", "true"]));
    assert_eq!(both.status.code(), Some(2), "--no-wait and --timeout exclude each other");
}

#[test]
fn a_timeout_in_bare_seconds_ends_the_wait_with_its_exit_code() {
    let store = redis();
    let _held = hold(&store, "W", "admin-8");

    let started = Instant::now();
    let timed_out = output(mutextree(&store).args(["run", "-w", "0.3", "W/x", "--", "true"]));
    assert_eq!(timed_out.status.code(), Some(4), "{}", text(&timed_out.stderr));
    assert!(started.elapsed() < Duration::from_secs(10), "0.3 means 0.3 s: {:?}", started.elapsed());
    let message = text(&timed_out.stderr);
    assert!(message.contains("admin-8") && message.contains("--timeout"), "{message}");
    assert!(!message.contains("waiting for"), "no waiting line without a terminal: {message}");

    let chosen = output(mutextree(&store).args(["run", "-w", "300ms", "-E", "75", "W", "--", "true"]));
    assert_eq!(chosen.status.code(), Some(75), "{}", text(&chosen.stderr));
}

#[test]
fn c_runs_a_shell_command_under_the_lock() {
    let store = memory();
    let ran = output(mutextree(&store).args(["run", "A/B", "-c", "echo $MUTEXTREE_PATH $MUTEXTREE_TOKEN; exit 7"]));
    assert_eq!(ran.status.code(), Some(7));
    assert_eq!(text(&ran.stdout), "A/B 1\n");

    let both = output(mutextree(&store).args(["run", "A", "-c", "true", "--", "true"]));
    assert_eq!(both.status.code(), Some(2), "-c and a command exclude each other: {}", text(&both.stderr));
    let neither = output(mutextree(&store).args(["run", "A"]));
    assert_eq!(neither.status.code(), Some(2), "a command is needed: {}", text(&neither.stderr));
}

#[test]
fn verbose_reports_the_grant_without_a_terminal() {
    let store = memory();
    let quiet = output(mutextree(&store).args(["run", "--ttl", "2", "A", "--", "true"]));
    assert!(quiet.status.success(), "{}", text(&quiet.stderr));
    assert!(!text(&quiet.stderr).contains("granted"), "{}", text(&quiet.stderr));

    let verbose = output(mutextree(&store).args(["run", "-v", "A", "--", "true"]));
    assert!(verbose.status.success());
    let message = text(&verbose.stderr);
    let report = message.lines().find(|line| line.contains("granted after ")).unwrap_or_else(|| panic!("{message}"));
    assert!(report.ends_with(", token 1"), "{report}");
}

/// `-v` prints the library's spans as they close (every command takes it),
/// `-vv` the wake-ups of a waiter too; without it, none.
#[test]
fn verbose_prints_the_librarys_events_and_very_verbose_the_wake_ups() {
    let store = redis();
    let _held = hold(&store, "T/b", "admin-t");
    let quiet = output(mutextree(&store).args(["run", "-w", "300ms", "T", "--", "true"]));
    assert!(!text(&quiet.stderr).contains("acquire{"), "{}", text(&quiet.stderr));

    let verbose = output(mutextree(&store).args(["-v", "run", "-w", "300ms", "T", "--", "true"]));
    assert_eq!(verbose.status.code(), Some(4), "{}", text(&verbose.stderr));
    let message = text(&verbose.stderr);
    let closed = message.lines().find(|line| line.contains("acquire{") && line.contains("close"));
    let closed = closed.unwrap_or_else(|| panic!("the acquisition's span, closed: {message}"));
    for field in ["store=\"redis\"", "path=T", "outcome=\"timed_out\""] {
        assert!(closed.contains(field), "{field} in {closed}");
    }
    assert!(message.contains("refused") && message.contains("admin-t"), "each refusal names its blocker: {message}");
    assert!(!message.contains("woken"), "wake-ups are for -vv: {message}");

    let very = output(mutextree(&store).args(["status", "-vv"]));
    assert!(very.status.success(), "every command takes -vv: {}", text(&very.stderr));
    let waiter = output(mutextree(&store).args(["run", "-vv", "-w", "300ms", "T", "--", "true"]));
    assert!(text(&waiter.stderr).contains("woken"), "{}", text(&waiter.stderr));
}

/// `status --watch` shows the namespace again every second until
/// interrupted, and a change between two showings is in the next one.
#[test]
fn status_watch_shows_again_until_interrupted() {
    let store = redis();
    let mut watcher = mutextree(&store).args(["status", "--watch"]).stdout(Stdio::piped()).spawn().expect("spawn");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let mut next_line = || lines.next().expect("a line").expect("text");
    assert!(next_line().starts_with("no locks held"), "the first showing");
    let held = hold(&store, "W/a", "watched");
    let shown = std::iter::from_fn(|| Some(next_line())).take(20).find(|line| line.contains("\"watched\""));
    assert!(shown.is_some(), "a lock taken after the first showing is in a later one");
    drop(held);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(watcher.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("interrupt");
    assert!(watcher.wait().expect("wait").success(), "an interrupted watch ends well");
}

#[test]
fn verbose_names_each_lock_waited_behind_without_a_terminal() {
    let store = redis();
    let _held = hold(&store, "V/b", "admin-v");
    let timed_out = output(mutextree(&store).args(["run", "-v", "-w", "300ms", "V/a", "-s", "V/b/c", "--", "true"]));
    assert_eq!(timed_out.status.code(), Some(4), "{}", text(&timed_out.stderr));
    let message = text(&timed_out.stderr);
    assert!(
        message.contains(
            "mutextree: waiting for V/a, V/b/c (shared) behind V/b (an ancestor of V/b/c) held exclusively by \"admin-v\""
        ),
        "{message}"
    );
    assert!(!message.contains("(shared) granted after"), "nothing granted: {message}");
}

#[test]
fn why_answers_in_json() {
    let store = redis();
    let held = hold(&store, "J/a", "admin-9");
    let blocked = output(mutextree(&store).args(["why", "J", "--json"]));
    assert_eq!(blocked.status.code(), Some(3));
    let answer: serde_json::Value = serde_json::from_slice(&blocked.stdout).expect("JSON");
    assert_eq!(answer["path"], "J");
    assert_eq!(answer["free"], false);
    assert_eq!(answer["blockers"][0]["path"], "J/a");
    assert_eq!(answer["blockers"][0]["relation"], "a descendant");
    assert_eq!(answer["blockers"][0]["owner"], "admin-9");
    assert_eq!(answer["blockers"][0]["token"], held.as_async().grant().expect("held").token);

    let free = output(mutextree(&store).args(["why", "K", "--json"]));
    assert_eq!(free.status.code(), Some(0));
    let answer: serde_json::Value = serde_json::from_slice(&free.stdout).expect("JSON");
    assert_eq!(answer, serde_json::json!({"path": "K", "mode": "exclusive", "free": true, "blockers": []}));
}

#[test]
fn bench_answers_in_json() {
    let bench = output(mutextree(&memory()).args(["bench", "--clients", "2", "--duration", "0.3", "--json"]));
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let figures: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("JSON");
    assert_eq!(figures["clients"], 2);
    assert_eq!(figures["scenario"], "siblings");
    assert_eq!(figures["duration_ms"], 300);
    assert!(figures["pairs"].as_u64().is_some_and(|pairs| pairs > 0), "{figures}");
    assert!(figures["p50_us"].as_u64().is_some(), "{figures}");
    assert_eq!(figures["round_trips_per_pair"], serde_json::Value::Null, "the memory store counts none");
}

#[test]
fn bench_runs_readers_with_a_writer_and_grants_of_two_paths() {
    for scenario in ["read-heavy", "two-paths"] {
        let bench =
            output(mutextree(&memory()).args(["bench", "--clients", "4", "--duration", "0.3", "--scenario", scenario]));
        assert!(bench.status.success(), "{scenario}: {}", text(&bench.stderr));
        let table = text(&bench.stdout);
        assert!(table.contains(&format!("| 4 | 3 | {scenario} | 0 | ")), "{table}");
    }
    let json = output(mutextree(&memory()).args([
        "bench",
        "--clients",
        "2",
        "--duration",
        "0.3",
        "--scenario",
        "two-paths",
        "--json",
    ]));
    let figures: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(figures["scenario"], "two-paths");
    assert!(figures["pairs"].as_u64().is_some_and(|pairs| pairs > 0), "{figures}");

    let alone = output(mutextree(&memory()).args(["bench", "--scenario", "read-heavy", "--duration", "0.3"]));
    assert_eq!(alone.status.code(), Some(2), "a writer needs readers: {}", text(&alone.stderr));
    assert!(text(&alone.stderr).contains("--clients 2 or more"), "{}", text(&alone.stderr));
    let unknown = output(mutextree(&memory()).args(["bench", "--scenario", "readers"]));
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("read-heavy, two-paths"), "{}", text(&unknown.stderr));
}

#[test]
fn bench_says_what_it_is_doing() {
    let (mut bench, terminal) =
        under_terminal(&memory(), 200, &[BINARY, "bench", "--clients", "3", "--duration", "2", "--background", "10"]);
    let mut seen = String::new();
    read_until(&terminal, &mut seen, |seen| {
        seen.contains("taking 10 background locks, then measuring 3 clients (siblings, depth 3) for 2.0 s")
    });
    read_until(&terminal, &mut seen, |seen| seen.contains("round trips per pair"));
    assert!(bench.wait().expect("wait").success(), "{seen:?}");
}

#[test]
fn status_names_the_namespace() {
    let empty = output(mutextree(&memory()).arg("status"));
    assert_eq!(text(&empty.stdout), "no locks held in namespace flags\n");
    let under = output(mutextree(&memory()).args(["--namespace", "other", "status", "A"]));
    assert_eq!(text(&under.stdout), "no locks held at or under A in namespace other\n");
}

#[test]
fn completions_and_the_manual_page_cover_every_subcommand() {
    let bash = output(Command::new(BINARY).args(["completions", "bash"]));
    assert!(bash.status.success());
    let script = text(&bash.stdout);
    assert!(script.contains("_mutextree()") && script.contains("complete -F _mutextree"), "{script}");
    assert!(script.contains("--no-wait") && script.contains("--conflict-exit-code"), "{script}");
    let checked = Command::new("bash").args(["-n", "-c", &script]).status().expect("bash runs");
    assert!(checked.success(), "the bash script parses");

    let man = output(Command::new(BINARY).arg("man"));
    assert!(man.status.success());
    let page = text(&man.stdout);
    assert!(page.starts_with(".ie \\n(.g .ds Aq") || page.starts_with(".TH"), "roff: {page}");
    assert!(page.contains(".TH mutextree 1") && page.contains(".SH NAME") && page.contains(".SH SYNOPSIS"), "{page}");
    for subcommand in ["run", "status", "why", "release", "bench", "completions", "man"] {
        assert!(page.contains(&format!("mutextree\\-{subcommand}(1)")), "{subcommand} is listed: {page}");
    }
}

#[test]
fn help_is_wrapped_to_the_terminal() {
    let (mut help, terminal) = under_terminal(&memory(), 60, &[BINARY, "run", "--help"]);
    let mut seen = String::new();
    read_until(&terminal, &mut seen, |seen| seen.contains("Examples:"));
    assert!(help.wait().expect("wait").success());
    while let Ok(chunk) = terminal.recv_timeout(Duration::from_secs(5)) {
        seen.push_str(&chunk);
    }
    let prose: Vec<&str> = seen.lines().filter(|line| !line.contains("mutextree ")).collect();
    assert!(prose.len() > 20, "{seen}");
    assert!(prose.iter().all(|line| line.trim_end().chars().count() <= 60), "lines of 60 columns at most: {seen}");
}

/// TLS is in the command's default build: a `rediss://` or `etcds://` store
/// is dialled (and, with nothing listening, refused), not turned away for a
/// missing feature.
#[test]
fn tls_stores_are_in_the_default_build() {
    for url in ["rediss://127.0.0.1:1?connect_timeout=2s", "etcds://127.0.0.1:1?connect_timeout=2s"] {
        let out = output(Command::new(BINARY).args(["--store", url, "status"]).stdin(Stdio::null()));
        let said = text(&out.stderr);
        assert!(!said.contains("feature"), "{url}: {said}");
        assert!(said.contains("127.0.0.1:1"), "{url}: the message should name the address it tried: {said}");
        assert_eq!(out.status.code(), Some(1), "{url}: the store failed: {said}");
    }
}
