//! A TCP proxy that breaks the connection between a client and a real
//! server on command.
//!
//! The fault-gated backend of [`cancel`](crate::cancel) cuts calls at the
//! API; this cuts them on the wire, where a store's client really breaks:
//! a request that reached the server but whose reply never came back, a
//! connection reset halfway through a reply, a peer that went silent. Each
//! store's tests put one proxy in front of each server and point their
//! clients at it.
//!
//! The faults are those TCP really shows. A black hole stops traffic both
//! ways and lets it through again afterwards (what retransmission does
//! after a short partition); dropped replies lose bytes, so a connection
//! that lost some is reset rather than resumed (TCP never delivers a
//! stream with a hole in it).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic, until told otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// Forwards everything as it comes.
    Pass,
    /// Forwards everything, each chunk this much later.
    Delay(Duration),
    /// Forwards nothing either way, and accepts new connections without
    /// forwarding on them either; the held traffic flows when the fault
    /// ends, as after a partition healed.
    BlackHole,
    /// Forwards requests to the server and throws its replies away: the
    /// server acts, the client never learns it. Connections that lost a
    /// reply are reset when the fault ends.
    DropReplies,
    /// Resets every connection once this many more bytes have passed on it
    /// (either way), cutting requests and replies at arbitrary offsets.
    CutAfter(usize),
    /// Resets new connections as soon as they are accepted (a server that
    /// is not there); open ones pass.
    Refuse,
}

/// Counts of what the proxy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections the proxy reset.
    pub resets: u64,
    /// Reply bytes thrown away.
    pub dropped_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    resets: AtomicU64,
    dropped_bytes: AtomicU64,
}

/// A proxy on a free loopback port; see the module docs. It stops, and
/// resets its connections, when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    fault: watch::Sender<NetFault>,
    /// Bumped by [`FaultProxy::reset_all`]; every connection watches it.
    resets: watch::Sender<u64>,
    counters: Arc<Counters>,
    accepting: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream`, passing everything.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let (fault, _) = watch::channel(NetFault::Pass);
        let (resets, _) = watch::channel(0);
        let counters = Arc::new(Counters::default());
        let accepting = tokio::spawn(accept(listener, upstream, fault.clone(), resets.clone(), counters.clone()));
        Ok(FaultProxy { address, fault, resets, counters, accepting })
    }

    /// A proxy to a server on a loopback port.
    pub async fn to_port(port: u16) -> io::Result<FaultProxy> {
        FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// From now on, traffic meets `fault` (on open connections too).
    pub fn set(&self, fault: NetFault) {
        self.fault.send_replace(fault);
    }

    /// The fault traffic meets now.
    pub fn fault(&self) -> NetFault {
        *self.fault.borrow()
    }

    /// Resets every open connection now; new ones are not affected.
    pub fn reset_all(&self) {
        self.resets.send_modify(|epoch| *epoch += 1);
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            resets: self.counters.resets.load(Ordering::Relaxed),
            dropped_bytes: self.counters.dropped_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.reset_all();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: watch::Sender<NetFault>,
    resets: watch::Sender<u64>,
    counters: Arc<Counters>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let connection = Connection {
            fault: fault.subscribe(),
            resets: resets.subscribe(),
            counters: counters.clone(),
            budget: None,
            lost_replies: false,
        };
        tokio::spawn(connection.run(client, upstream));
    }
}

/// Which way a chunk goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Request,
    Reply,
}

struct Connection {
    fault: watch::Receiver<NetFault>,
    resets: watch::Receiver<u64>,
    counters: Arc<Counters>,
    /// Bytes left before a [`NetFault::CutAfter`] resets the connection.
    budget: Option<usize>,
    /// Whether a reply was thrown away: the stream has a hole.
    lost_replies: bool,
}

/// What to do with a connection after a chunk or a change of fault.
enum Next {
    Go,
    Reset,
    Closed,
}

impl Connection {
    async fn run(mut self, mut client: TcpStream, upstream: SocketAddr) {
        if *self.fault.borrow() == NetFault::Refuse {
            self.reset(&client, None);
            return;
        }
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            // The server is not there: the client sees a reset, as it would
            // connecting to it directly.
            self.reset(&client, None);
            return;
        };
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        let reset = self.forward(&mut client, &mut server).await;
        if reset {
            self.reset(&client, Some(&server));
        }
    }

    /// Forwards until either side closes (false) or a fault resets the
    /// connection (true).
    async fn forward(&mut self, client: &mut TcpStream, server: &mut TcpStream) -> bool {
        let (mut from_client, mut from_server) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
        loop {
            let next = tokio::select! {
                read = client.read(&mut from_client) => match read {
                    Ok(0) | Err(_) => Next::Closed,
                    Ok(n) => self.pass(Way::Request, &from_client[..n], server).await,
                },
                read = server.read(&mut from_server) => match read {
                    Ok(0) | Err(_) => Next::Closed,
                    Ok(n) => self.pass(Way::Reply, &from_server[..n], client).await,
                },
                _ = self.resets.changed() => Next::Reset,
                _ = self.fault.changed() => self.after_change(),
            };
            match next {
                Next::Go => {}
                Next::Reset => return true,
                Next::Closed => return false,
            }
        }
    }

    /// A connection that lost replies cannot resume when the fault ends.
    fn after_change(&mut self) -> Next {
        let fault = *self.fault.borrow_and_update();
        if self.lost_replies && fault != NetFault::DropReplies {
            Next::Reset
        } else {
            Next::Go
        }
    }

    /// Forwards one chunk as the current fault says.
    async fn pass(&mut self, way: Way, chunk: &[u8], to: &mut TcpStream) -> Next {
        loop {
            let fault = *self.fault.borrow_and_update();
            if !matches!(fault, NetFault::CutAfter(_)) {
                self.budget = None;
            }
            if self.lost_replies && fault != NetFault::DropReplies {
                return Next::Reset;
            }
            match fault {
                NetFault::Pass | NetFault::Refuse => return write(to, chunk).await,
                NetFault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    return write(to, chunk).await;
                }
                NetFault::BlackHole => {
                    // Held until the fault changes (or the connection is
                    // reset); then judged again.
                    tokio::select! {
                        changed = self.fault.changed() => if changed.is_err() { return Next::Closed },
                        _ = self.resets.changed() => return Next::Reset,
                    }
                }
                NetFault::DropReplies if way == Way::Reply => {
                    self.lost_replies = true;
                    self.counters.dropped_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    return Next::Go;
                }
                NetFault::DropReplies => return write(to, chunk).await,
                NetFault::CutAfter(limit) => {
                    let left = *self.budget.get_or_insert(limit);
                    if chunk.len() < left {
                        self.budget = Some(left - chunk.len());
                        return write(to, chunk).await;
                    }
                    let _ = write(to, &chunk[..left]).await;
                    return Next::Reset;
                }
            }
        }
    }

    /// Closes both sides with a reset (RST), not an orderly close.
    fn reset(&self, client: &TcpStream, server: Option<&TcpStream>) {
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        // A zero linger never blocks: the close sends RST at once, which is
        // the point (the deprecation warns about non-zero lingers).
        #[allow(deprecated)]
        for stream in std::iter::once(client).chain(server) {
            let _ = stream.set_linger(Some(Duration::ZERO));
        }
    }
}

async fn write(to: &mut TcpStream, chunk: &[u8]) -> Next {
    match to.write_all(chunk).await {
        Ok(()) => Next::Go,
        Err(_) => Next::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    /// An echo server: every byte comes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                        if stream.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    const SHORT: Duration = Duration::from_millis(200);
    const LONG: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn passes_delays_and_holds_traffic() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut stream, b"one").await.expect("pass"), b"one");

        proxy.set(NetFault::Delay(SHORT));
        let started = tokio::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"two").await.expect("delay"), b"two");
        assert!(started.elapsed() >= SHORT * 2, "each way is delayed");

        proxy.set(NetFault::BlackHole);
        assert!(timeout(SHORT, round_trip(&mut stream, b"three")).await.is_err(), "nothing passes");
        proxy.set(NetFault::Pass);
        let mut held = [0u8; 5];
        timeout(LONG, stream.read_exact(&mut held)).await.expect("released").expect("read");
        assert_eq!(&held, b"three", "held traffic flows when the fault ends");
        assert_eq!(proxy.stats().resets, 0);
    }

    #[tokio::test]
    async fn dropped_replies_reach_the_server_and_reset_the_connection_after() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut stream, b"x").await.expect("pass"), b"x");
        proxy.set(NetFault::DropReplies);
        assert!(timeout(SHORT, round_trip(&mut stream, b"lost")).await.is_err());
        // The echo's reply was the proof the request arrived.
        let deadline = tokio::time::Instant::now() + LONG;
        while proxy.stats().dropped_bytes < 4 {
            assert!(tokio::time::Instant::now() < deadline, "the request never reached the server");
            tokio::task::yield_now().await;
        }
        proxy.set(NetFault::Pass);
        let mut rest = Vec::new();
        let end = timeout(LONG, stream.read_to_end(&mut rest)).await.expect("closed");
        assert!(end.is_err() || rest.is_empty(), "the stream with a hole ends: {end:?} {rest:?}");
        assert_eq!(proxy.stats().resets, 1);
        let mut fresh = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut fresh, b"new").await.expect("new connection passes"), b"new");
    }

    #[tokio::test]
    async fn cuts_after_the_given_bytes_and_resets_on_demand() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        proxy.set(NetFault::CutAfter(5));
        // 4 bytes out and 1 of the 4 back: the echo's reply is cut.
        stream.write_all(b"abcd").await.expect("write");
        let mut back = Vec::new();
        let _ = timeout(LONG, stream.read_to_end(&mut back)).await.expect("reset");
        assert!(back.len() <= 1, "{back:?}");

        proxy.set(NetFault::Pass);
        let mut other = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut other, b"ok").await.expect("pass"), b"ok");
        proxy.reset_all();
        let mut rest = Vec::new();
        let _ = timeout(LONG, other.read_to_end(&mut rest)).await.expect("reset");

        proxy.set(NetFault::Refuse);
        let mut refused = TcpStream::connect(proxy.address()).await.expect("accepted, then reset");
        assert!(timeout(LONG, round_trip(&mut refused, b"no")).await.expect("answered").is_err());
        assert!(proxy.stats().resets >= 3, "{:?}", proxy.stats());
    }
}
