//! Store URLs through `mutextree::connect`, on each store this build has:
//! every duration parameter reads as `--ttl` does, and PostgreSQL's own
//! words reach the error a person sees.

#![cfg(any(feature = "redis", feature = "postgres", feature = "etcd"))]

use mutextree::blocking;

/// Each store's test server as `mutextree::connect` takes it.
fn urls() -> Vec<String> {
    [
        #[cfg(feature = "redis")]
        conformance::servers::redis::url(),
        #[cfg(feature = "postgres")]
        conformance::servers::postgres::url(),
        #[cfg(feature = "etcd")]
        conformance::servers::etcd::connect_url(),
    ]
    .into()
}

#[test]
fn every_duration_in_a_url_reads_as_the_command_line_reads_it() {
    for url in urls() {
        for (connect, request) in [("1m", "1500ms"), ("2s", "90"), ("1500ms", "1m")] {
            let separator = if url.contains('?') { '&' } else { '?' };
            let with = format!("{url}{separator}connect_timeout={connect}&request_timeout={request}");
            let store = blocking::connect(&with).unwrap_or_else(|error| panic!("{with}: {error}"));
            let lock = blocking::TreeLock::new(store, "durations").expect("lock");
            lock.try_acquire().unwrap_or_else(|error| panic!("{with}: {error}"));
            lock.release().expect("release");
        }
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_errors_carry_the_servers_own_words() {
    let url = conformance::servers::postgres::url();
    let nobody = url.replacen("postgres://postgres@", "postgres://nobody@", 1);
    let error = blocking::connect(&nobody).expect_err("no such role");
    assert!(error.to_string().contains(r#"role "nobody" does not exist"#), "{error}");
    assert!(!error.is_retryable(), "a wrong role is not cured by retrying: {error}");
    let (base, _database) = url.rsplit_once('/').expect("a database in the URL");
    let missing = format!("{base}/x");
    let error = blocking::connect(&missing).expect_err("no such database");
    assert!(error.to_string().contains(r#"database "x" does not exist"#), "{error}");
}
