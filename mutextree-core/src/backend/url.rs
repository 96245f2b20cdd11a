//! Store URLs, for the stores' configuration readers: one reader, so that
//! every store reads hosts, credentials, durations and parameters alike and
//! refuses the same mistakes with the same messages.
//!
//! A store's `from_url` parses the text with [`StoreUrl::parse`], takes the
//! parameters it knows one by one ([`StoreUrl::take`] and its typed
//! variants) and ends with [`StoreUrl::finish`]: a parameter nobody took is
//! an error naming it, so a misspelt option is never ignored. Nothing here
//! dials: a bad port or a missing host is an [`Error::InvalidConfig`]
//! before any connection, never a retryable store error.
//!
//! Credentials are percent-decoded from the URL's user-info and never
//! shown: [`StoreUrl`]'s `Display` and `Debug` print `***` for the
//! password, and no error here repeats the URL.
//!
//! Opening a connection is bounded the same way everywhere too:
//! [`connect_within`] gives the `connect_timeout` message every store
//! shares.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::error::Error;
use crate::lock::Namespace;
use crate::text::human;

/// How long opening a store's connection may take unless its URL's
/// `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request to a store may take unless its URL's
/// `request_timeout` says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest timeout a configuration accepts.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// The longest timeout a configuration accepts: a longer one is surely a
/// unit mistake.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A store URL, read: `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?name=value&...]`.
///
/// ```
/// use mutextree_core::backend::StoreUrl;
///
/// let mut url = StoreUrl::parse("redis", "redis://app:s%40cret@[::1]:6379,cache-2/0?namespace=fleet")?;
/// assert_eq!(url.password(), Some("s@cret"));
/// assert_eq!(url.hosts()[0].address(6379), "[::1]:6379");
/// assert_eq!(url.hosts()[1].address(6379), "cache-2:6379");
/// assert_eq!(url.path(), "/0");
/// assert_eq!(url.take_namespace()?.as_str(), "fleet");
/// assert_eq!(url.to_string(), "redis://app:***@[::1]:6379,cache-2/0");
/// url.finish(&["namespace"])?;
/// # Ok::<(), mutextree_core::Error>(())
/// ```
#[derive(Clone)]
pub struct StoreUrl {
    store: &'static str,
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<Host>,
    path: String,
    /// The query's parameters not taken yet, decoded.
    params: Vec<(String, String)>,
}

/// One host of a URL's host list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The name or address, percent-decoded, without the brackets of an
    /// IPv6 address.
    pub name: String,
    /// The port, if the URL gives one.
    pub port: Option<u16>,
}

impl Host {
    /// `name:port`, with `default_port` if the URL gives none and brackets
    /// around an IPv6 address: what a client dials and a message names.
    pub fn address(&self, default_port: u16) -> String {
        let port = self.port.unwrap_or(default_port);
        if self.name.contains(':') {
            format!("[{}]:{port}", self.name)
        } else {
            format!("{}:{port}", self.name)
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name.contains(':'), self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.name),
            (true, None) => write!(f, "[{}]", self.name),
            (false, Some(port)) => write!(f, "{}:{port}", self.name),
            (false, None) => f.write_str(&self.name),
        }
    }
}

impl StoreUrl {
    /// Reads `text`; errors are [`Error::InvalidConfig`] of `store` and
    /// never repeat the URL (it may hold a password).
    ///
    /// Every host of the comma-separated list must have a name, and its
    /// port, if any, must be a number from 1 to 65535. A URL may name no
    /// host at all (`redis+unix:///run/redis.sock`): a store that needs one
    /// asks with [`require_hosts`](Self::require_hosts). A parameter given
    /// twice is an error: which one would win is a guess.
    pub fn parse(store: &'static str, text: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidConfig { store, reason };
        let (scheme, rest) = text
            .split_once("://")
            .filter(|(scheme, _)| !scheme.is_empty())
            .ok_or_else(|| invalid(format!("this is not a URL: write {store}://host:port")))?;
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = before_query.find('/').map_or((before_query, ""), |at| before_query.split_at(at));
        let (user_info, host_list) = match authority.rsplit_once('@') {
            Some((user_info, host_list)) => (Some(user_info), host_list),
            None => (None, authority),
        };
        let (user, password) = match user_info.map(|info| info.split_once(':').unwrap_or((info, ""))) {
            Some((user, password)) => (
                Some(decode(user)).filter(|user| !user.is_empty()),
                Some(decode(password)).filter(|password| !password.is_empty()),
            ),
            None => (None, None),
        };
        let hosts = if host_list.is_empty() {
            Vec::new()
        } else {
            host_list.split(',').map(|host| parse_host(host).map_err(&invalid)).collect::<Result<_, _>>()?
        };
        let mut params: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if params.iter().any(|(seen, _)| *seen == name) {
                return Err(invalid(format!("URL parameter {name:?} is given twice: give it once")));
            }
            params.push((name.into_owned(), value.into_owned()));
        }
        Ok(StoreUrl { store, scheme: scheme.to_owned(), user, password, hosts, path: decode(path), params })
    }

    /// The scheme, e.g. `redis+cluster`.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user name, percent-decoded.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, percent-decoded.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The hosts, in the URL's order (none for a URL such as
    /// `redis+unix:///run/redis.sock`).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The hosts, or an error saying that the URL names none.
    pub fn require_hosts(&self) -> Result<&[Host], Error> {
        if self.hosts.is_empty() {
            return Err(self.invalid(format!(
                "the URL names no host: write {}://host:port (several hosts separated by commas where the store \
                 takes several)",
                self.scheme
            )));
        }
        Ok(&self.hosts)
    }

    /// The path, percent-decoded, with its leading `/`; empty if the URL
    /// has none.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Takes the parameter `name`, if given.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let at = self.params.iter().position(|(given, _)| given == name)?;
        Some(self.params.remove(at).1)
    }

    /// Takes the parameter `name` and parses it; `expected` says what a
    /// right value looks like (`"a number of connections"`).
    pub fn take_parsed<T: FromStr>(&mut self, name: &str, expected: &str) -> Result<Option<T>, Error> {
        self.take(name)
            .map(|value| value.parse().map_err(|_| self.invalid(format!("{name}={value:?}: write {expected}"))))
            .transpose()
    }

    /// Takes a `true`/`false` parameter (`1`/`0` and `yes`/`no` too).
    pub fn take_bool(&mut self, name: &str) -> Result<Option<bool>, Error> {
        self.take(name)
            .map(|value| match &*value {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(self.invalid(format!("{name}={value:?}: write true or false"))),
            })
            .transpose()
    }

    /// Takes a duration parameter, in [`parse_duration`]'s grammar.
    pub fn take_duration(&mut self, name: &str) -> Result<Option<Duration>, Error> {
        self.take(name)
            .map(|value| {
                parse_duration(&value)
                    .ok_or_else(|| self.invalid(format!("{name}={value:?}: write {DURATION_EXAMPLES}")))
            })
            .transpose()
    }

    /// Takes a duration parameter, in [`parse_duration`]'s grammar, from
    /// [`MIN_TIMEOUT`] to [`MAX_TIMEOUT`].
    pub fn take_timeout(&mut self, name: &str) -> Result<Option<Duration>, Error> {
        self.take_duration(name)?.map(|timeout| checked_timeout(self.store, name, timeout)).transpose()
    }

    /// Takes `connect_timeout`, the limit every store puts on opening its
    /// connection ([`DEFAULT_CONNECT_TIMEOUT`] if not given).
    pub fn take_connect_timeout(&mut self) -> Result<Duration, Error> {
        Ok(self.take_timeout("connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT))
    }

    /// Takes `request_timeout`, the limit every store puts on one
    /// request ([`DEFAULT_REQUEST_TIMEOUT`] if not given).
    pub fn take_request_timeout(&mut self) -> Result<Duration, Error> {
        Ok(self.take_timeout("request_timeout")?.unwrap_or(DEFAULT_REQUEST_TIMEOUT))
    }

    /// Takes `namespace`, checked by [`Namespace::new`] (the default
    /// namespace if not given).
    pub fn take_namespace(&mut self) -> Result<Namespace, Error> {
        self.take("namespace").map_or_else(|| Ok(Namespace::default()), Namespace::new)
    }

    /// The parameters not taken yet, in the URL's order: what a store
    /// passes on to its client library, if it passes anything on.
    pub fn remaining(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// Ends the reading: a parameter not taken is an error naming it and
    /// listing `known`, the store's parameters.
    pub fn finish(self, known: &[&str]) -> Result<(), Error> {
        match self.params.first() {
            None => Ok(()),
            Some((name, _)) => {
                Err(self.invalid(format!("unknown URL parameter {name:?}; the known ones are {}", known.join(", "))))
            }
        }
    }

    /// An [`Error::InvalidConfig`] of this URL's store.
    pub fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig { store: self.store, reason: reason.into() }
    }
}

impl fmt::Display for StoreUrl {
    /// The URL without its query, the password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        match (&self.user, &self.password) {
            (Some(user), Some(_)) => write!(f, "{user}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            (Some(user), None) => write!(f, "{user}@")?,
            (None, None) => {}
        }
        for (index, host) in self.hosts.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{host}")?;
        }
        f.write_str(&self.path)
    }
}

impl fmt::Debug for StoreUrl {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreUrl")
            .field("scheme", &self.scheme)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("hosts", &self.hosts)
            .field("path", &self.path)
            .field("params", &self.params)
            .finish()
    }
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// `name`, `name:port`, `[v6]` or `[v6]:port`.
fn parse_host(text: &str) -> Result<Host, String> {
    let (name, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (name, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("host {text:?} opens a [ it does not close: write [::1]:port"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| format!("host {text:?}: write [address]:port"))?),
        };
        (name, port)
    } else {
        match text.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(format!("host {text:?}: write an IPv6 address in brackets, e.g. [::1]:port"))
            }
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    if name.is_empty() {
        return Err(if text.is_empty() {
            "the host list has an empty entry: write host:port[,host:port...]".to_owned()
        } else {
            format!("host {text:?} has no name: write e.g. 127.0.0.1{text}")
        });
    }
    let port = match port {
        None => None,
        Some("") => {
            return Err(format!("host {text:?} has nothing after ':': write a port from 1 to 65535, or no ':'"))
        }
        Some(port) => Some(
            port.parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("port {port:?} of host {name:?} is not a number from 1 to 65535"))?,
        ),
    };
    Ok(Host { name: decode(name), port })
}

/// What [`parse_duration`] reads, for messages.
pub const DURATION_EXAMPLES: &str = "a duration such as 1500ms, 2s or 1m (a bare number is seconds)";

/// A duration as people write them in URLs and on the command line:
/// humantime's grammar (`500ms`, `2s`, `1.5s`, `1m`, `1h 30m`), and a bare
/// number (`5`, `0.25`) counts seconds.
///
/// ```
/// use std::time::Duration;
/// use mutextree_core::backend::parse_duration;
///
/// assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
/// assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
/// assert_eq!(parse_duration("2 parsecs"), None);
/// ```
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return text.parse::<f64>().ok().and_then(|secs| Duration::try_from_secs_f64(secs).ok());
    }
    humantime::parse_duration(text).ok()
}

/// `timeout`, if it is from [`MIN_TIMEOUT`] to [`MAX_TIMEOUT`]; otherwise
/// an [`Error::InvalidConfig`] of `store` naming the setting `name`.
pub fn checked_timeout(store: &'static str, name: &str, timeout: Duration) -> Result<Duration, Error> {
    if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        Ok(timeout)
    } else {
        Err(Error::InvalidConfig {
            store,
            reason: format!("{name} of {}: write a duration from 1ms to 1h", human(timeout)),
        })
    }
}

/// Runs `connecting`, a store's one attempt to open its connection to
/// `addresses`, for at most `limit` (the store's `connect_timeout`). Running
/// out of time is a retryable [`Error::Store`]: `could not connect to etcd
/// at 127.0.0.1:2379 within 5 s (connect_timeout)`.
pub async fn connect_within<T>(
    store: &'static str,
    addresses: &str,
    limit: Duration,
    connecting: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, connecting).await.unwrap_or_else(|_| Err(connect_timed_out(store, addresses, limit)))
}

/// The error of [`connect_within`], for a store whose client library ran
/// out of the same time first.
pub fn connect_timed_out(store: &'static str, addresses: &str, limit: Duration) -> Error {
    let limit = if limit.subsec_nanos() == 0 { format!("{} s", limit.as_secs()) } else { human(limit) };
    Error::store_message(
        store,
        true,
        format!("could not connect to {store} at {addresses} within {limit} (connect_timeout)"),
    )
}

/// A failure to connect to `addresses`, as [`Error::Store`]: `could not
/// connect to redis at 127.0.0.1:1: Connection refused (os error 111)`,
/// with the text of every error in `source`'s chain (client libraries often
/// keep the useful part one `source()` down).
pub fn connect_failed(
    store: &'static str,
    addresses: &str,
    retryable: bool,
    source: impl StdError + Send + Sync + 'static,
) -> Error {
    Error::Store {
        store,
        message: format!("could not connect to {store} at {addresses}: {}", with_sources(&source)),
        retryable,
        source: Some(Box::new(source)),
    }
}

/// An error's text followed by its sources', each once: `error connecting
/// to server: Connection refused (os error 111)`.
pub fn with_sources(error: &(dyn StdError + 'static)) -> String {
    append_sources(error.to_string(), error.source())
}

/// `text` followed by the text of `source` and of its own sources, each
/// that `text` does not say yet.
pub fn append_sources(mut text: String, source: Option<&(dyn StdError + 'static)>) -> String {
    let mut source = source;
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> StoreUrl {
        StoreUrl::parse("test", text).expect(text)
    }

    fn refusal(text: &str) -> String {
        match StoreUrl::parse("test", text) {
            Err(Error::InvalidConfig { reason, .. }) => reason,
            other => panic!("{text}: expected an invalid configuration, got {other:?}"),
        }
    }

    fn host(name: &str, port: Option<u16>) -> Host {
        Host { name: name.to_owned(), port }
    }

    #[test]
    fn hosts_ports_and_ipv6() {
        assert_eq!(
            parse("etcd://a:2379,b,[::1]:2380,[fe80::1]").hosts(),
            [host("a", Some(2379)), host("b", None), host("::1", Some(2380)), host("fe80::1", None)]
        );
        assert_eq!(parse("redis://[::1]:6379").hosts()[0].address(1), "[::1]:6379");
        assert_eq!(parse("redis://h").hosts()[0].address(6379), "h:6379");
        assert!(parse("redis+unix:///run/redis.sock").hosts().is_empty());
        assert_eq!(parse("redis+unix:///run/redis.sock").path(), "/run/redis.sock");
        assert!(parse("postgres://").require_hosts().is_err());
    }

    #[test]
    fn bad_hosts_and_ports_are_named() {
        for (text, says) in [
            ("etcd://127.0.0.1:notaport", "\"notaport\""),
            ("etcd://127.0.0.1:99999", "\"99999\""),
            ("etcd://127.0.0.1:0", "\"0\""),
            ("etcd://127.0.0.1:", "nothing after ':'"),
            ("etcd://:2379", "no name"),
            ("etcd://a:1,,b:2", "empty entry"),
            ("etcd://a:1,", "empty entry"),
            ("redis://::1:6379", "brackets"),
            ("redis://[::1:6379", "does not close"),
            ("redis://[::1]6379", "[address]:port"),
            ("localhost:6379", "not a URL"),
            ("://h", "not a URL"),
            ("redis://h?a=1&a=2", "given twice"),
        ] {
            let reason = refusal(text);
            assert!(reason.contains(says), "{text}: {reason}");
        }
    }

    #[test]
    fn credentials_are_decoded_and_never_shown() {
        let url = parse("postgres://app%20user:p%40ss:w0rd@db:5433/my%20db?sslmode=require");
        assert_eq!(url.user(), Some("app user"));
        assert_eq!(url.password(), Some("p@ss:w0rd"));
        assert_eq!(url.path(), "/my db");
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("p@ss") && !shown.contains("w0rd") && shown.contains("***"), "{shown}");
        }
        assert_eq!(parse("redis://:secret@h").to_string(), "redis://:***@h");
        assert_eq!(parse("redis://u@h").to_string(), "redis://u@h");
        // The last `@` ends the user-info: an unencoded `@` in a password works.
        assert_eq!(parse("redis://u:a@b@h").password(), Some("a@b"));
        let refused = StoreUrl::parse("test", "redis://u:secret@h:x").expect_err("bad port").to_string();
        assert!(!refused.contains("secret"), "{refused}");
    }

    #[test]
    fn parameters_are_decoded_taken_and_the_rest_named() {
        let mut url = parse("etcd://h?namespace=a%3Ab&connect_timeout=1m&flag=yes&size=4&text=a+b%26c");
        assert_eq!(url.take_namespace().expect("valid").as_str(), "a:b");
        assert_eq!(url.take_connect_timeout().expect("valid"), Duration::from_secs(60));
        assert_eq!(url.take_bool("flag").expect("valid"), Some(true));
        assert_eq!(url.take_parsed::<usize>("size", "a number").expect("valid"), Some(4));
        assert_eq!(url.take("absent"), None);
        assert_eq!(url.remaining().collect::<Vec<_>>(), [("text", "a b&c")]);
        let error = url.finish(&["namespace", "connect_timeout"]).expect_err("left over").to_string();
        assert!(error.contains("unknown URL parameter \"text\"; the known ones are namespace, connect_timeout"));

        let mut defaults = parse("etcd://h");
        assert_eq!(defaults.take_namespace().expect("default"), Namespace::default());
        assert_eq!(defaults.take_connect_timeout().expect("default"), DEFAULT_CONNECT_TIMEOUT);
        defaults.finish(&[]).expect("nothing left");

        for (query, says) in [
            ("connect_timeout=5x", "1500ms"),
            ("connect_timeout=0ms", "from 1ms to 1h"),
            ("connect_timeout=2h", "from 1ms to 1h"),
            ("namespace=a%7Bb%7D", "namespace"),
        ] {
            let mut url = parse(&format!("etcd://h?{query}"));
            let error = url.take_connect_timeout().and_then(|_| url.take_namespace()).expect_err(query);
            assert!(error.to_string().contains(says), "{query}: {error}");
        }
    }

    #[test]
    fn durations_read_like_humantime_and_bare_numbers_are_seconds() {
        for (text, expected) in [
            ("1m", Duration::from_secs(60)),
            ("1500ms", Duration::from_millis(1500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1h 30m", Duration::from_secs(5400)),
            ("5", Duration::from_secs(5)),
            ("0.25", Duration::from_millis(250)),
            (" 2s ", Duration::from_secs(2)),
        ] {
            assert_eq!(parse_duration(text), Some(expected), "{text}");
        }
        for text in ["", "s", "5x", "-1s", "1.2.3", "ms"] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connecting_for_too_long_says_where_and_which_setting() {
        let never = std::future::pending::<Result<(), Error>>();
        let error = connect_within("etcd", "127.0.0.1:2379", DEFAULT_CONNECT_TIMEOUT, never).await.expect_err("late");
        assert_eq!(
            error.to_string(),
            "etcd store error: could not connect to etcd at 127.0.0.1:2379 within 5 s (connect_timeout)"
        );
        assert!(error.is_retryable());
        let never = std::future::pending::<Result<(), Error>>();
        let error = connect_within("redis", "h:1", Duration::from_millis(300), never).await.expect_err("late");
        assert!(error.to_string().ends_with("within 300 ms (connect_timeout)"), "{error}");
    }

    #[test]
    fn the_source_chain_is_spelled_out() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let error = connect_failed("redis", "127.0.0.1:1", true, refused);
        assert_eq!(
            error.to_string(),
            "redis store error: could not connect to redis at 127.0.0.1:1: Connection refused"
        );

        /// A client error whose Display hides its cause, as many do.
        #[derive(Debug)]
        struct Vague(std::io::Error);
        impl fmt::Display for Vague {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("db error")
            }
        }
        impl StdError for Vague {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let said = Vague(std::io::Error::other("FATAL: role \"nobody\" does not exist"));
        assert_eq!(with_sources(&said), "db error: FATAL: role \"nobody\" does not exist");
        let appended = append_sources("refused".to_owned(), Some(&said));
        assert_eq!(appended, "refused: db error: FATAL: role \"nobody\" does not exist");
    }
}
