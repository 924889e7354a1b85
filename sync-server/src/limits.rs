//! Limits that keep one client (or one address) from taking the relay:
//! connections in total and per address, new connections per address per
//! second, and messages and bytes per second per connection. (Documents per
//! connection, the size of one change and of one document, and the
//! handshake deadline are the engine's: see `EngineConfig`.)
//!
//! The address of a connection is its TCP peer, unless that peer is one of
//! the configured trusted proxies: then it is the right-most address in
//! `X-Forwarded-For` that is not a trusted proxy. Nobody else's
//! `X-Forwarded-For` is believed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::HeaderMap;

/// The limits' settings (flags in [`crate::config::Config`]).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open WebSocket connections in total.
    pub max_connections: usize,
    /// Open WebSocket connections from one address.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections one address may open per second (with a
    /// burst of as many).
    pub new_connections_per_ip_per_sec: f64,
    /// Messages per second one connection may send (burst: ten seconds'
    /// worth, for a client that opens with a sync message for each of its
    /// many documents).
    pub messages_per_sec: f64,
    /// Bytes per second one connection may send (burst: two seconds'
    /// worth, and at least one largest message).
    pub bytes_per_sec: f64,
    /// HTTP API requests one address may make per second (two seconds'
    /// worth in a burst); faster gets HTTP 429.
    pub http_requests_per_ip_per_sec: f64,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_connections_per_ip: 256,
            new_connections_per_ip_per_sec: 32.0,
            messages_per_sec: 2_000.0,
            bytes_per_sec: 32.0 * 1024.0 * 1024.0,
            http_requests_per_ip_per_sec: 100.0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: f64) -> bool {
        self.take_at(n, Instant::now())
    }

    fn take_at(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
    }

    /// Whether it has refilled completely (its owner has been quiet long
    /// enough that forgetting it changes nothing).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Addresses whose HTTP buckets are kept before the full ones (idle
/// addresses) are forgotten.
const HTTP_ADDRESSES_KEPT: usize = 4096;

/// Why a connection was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The relay holds its maximum of connections (HTTP 503).
    Full(usize),
    /// The address holds its maximum (HTTP 429).
    PerIp(usize),
    /// The address opens connections too fast (HTTP 429).
    TooFast,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full(n) => write!(f, "the relay is full ({n} connections)"),
            Refused::PerIp(n) => write!(f, "too many connections from this address (at most {n})"),
            Refused::TooFast => {
                f.write_str("too many new connections from this address; slow down")
            }
        }
    }
}

#[derive(Debug)]
struct PerIp {
    open: usize,
    new: Bucket,
}

/// Counts connections, in total and per address.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, PerIp>>,
    /// HTTP API requests per address.
    http: Mutex<HashMap<IpAddr, Bucket>>,
}

/// A connection's place, and the messages and bytes it may still send
/// (token buckets refilled at the limits' rates); dropping it frees the
/// place. One per connection, so it is kept small: the rates live in the
/// gate.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
    messages: f64,
    bytes: f64,
    byte_burst: f64,
    at: Instant,
}

impl Slot {
    /// Counts one message of `len` bytes; false if it is over the rate
    /// (nothing is taken then).
    pub fn allow(&mut self, len: usize) -> bool {
        let l = &self.gate.limits;
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.messages = (self.messages + secs * l.messages_per_sec).min(message_burst(l));
        self.bytes = (self.bytes + secs * l.bytes_per_sec).min(self.byte_burst);
        if self.messages >= 1.0 && self.bytes >= len as f64 {
            self.messages -= 1.0;
            self.bytes -= len as f64;
            true
        } else {
            false
        }
    }
}

/// Ten seconds' worth of messages (see [`Limits::messages_per_sec`]).
fn message_burst(l: &Limits) -> f64 {
    (l.messages_per_sec * 10.0).max(1.0)
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.total.fetch_sub(1, Ordering::Relaxed);
        let mut by_ip = self.gate.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = by_ip.get_mut(&self.ip) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    /// A gate with these limits.
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            http: Mutex::new(HashMap::new()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The address a connection counts against (see the module docs).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.limits.trusted_proxies.contains(ip);
        if !trusted(&peer.ip()) {
            return peer.ip();
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|ip| !trusted(ip))
            .copied()
            .unwrap_or(peer.ip())
    }

    /// Counts one HTTP API request from `ip`; false if the address is
    /// over its rate.
    pub fn http_request(&self, ip: IpAddr) -> bool {
        self.http_request_at(ip, Instant::now())
    }

    fn http_request_at(&self, ip: IpAddr, now: Instant) -> bool {
        let rate = self.limits.http_requests_per_ip_per_sec;
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        if http.len() >= HTTP_ADDRESSES_KEPT && !http.contains_key(&ip) {
            http.retain(|_, bucket| !bucket.is_full(now));
        }
        let burst = (rate * 2.0).max(1.0);
        http.entry(ip)
            .or_insert_with(|| Bucket {
                rate,
                burst,
                tokens: burst,
                at: now,
            })
            .take_at(1.0, now)
    }

    /// Lets a connection from `ip` in, or says why not. Its byte burst
    /// is two seconds' worth and at least one largest message.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max_message_bytes: usize) -> Result<Slot, Refused> {
        let limits = &self.limits;
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= limits.max_connections {
            return Err(Refused::Full(limits.max_connections));
        }
        let rate = limits.new_connections_per_ip_per_sec;
        let entry = by_ip.entry(ip).or_insert_with(|| PerIp {
            open: 0,
            new: Bucket::new(rate, rate.max(1.0)),
        });
        if entry.open >= limits.max_connections_per_ip {
            return Err(Refused::PerIp(limits.max_connections_per_ip));
        }
        if !entry.new.take(1.0) {
            return Err(Refused::TooFast);
        }
        entry.open += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        let byte_burst = (limits.bytes_per_sec * 2.0).max(max_message_bytes as f64);
        Ok(Slot {
            gate: self.clone(),
            ip,
            messages: message_burst(limits),
            bytes: byte_burst,
            byte_burst,
            at: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let gate = Gate::new(Limits {
            trusted_proxies: vec!["10.0.0.1".parse().expect("ip")],
            ..Limits::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.1".parse().expect("header"),
        );
        let proxy: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let stranger: SocketAddr = "9.9.9.9:5000".parse().expect("addr");
        assert_eq!(
            gate.client_ip(proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(gate.client_ip(stranger, &headers), stranger.ip());
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let gate = Gate::new(Limits {
            max_connections: 3,
            max_connections_per_ip: 2,
            new_connections_per_ip_per_sec: 100.0,
            ..Limits::default()
        });
        let a: IpAddr = "1.1.1.1".parse().expect("ip");
        let b: IpAddr = "2.2.2.2".parse().expect("ip");
        let one = gate.admit(a, 1024).expect("first");
        let _two = gate.admit(a, 1024).expect("second");
        assert_eq!(gate.admit(a, 1024).err(), Some(Refused::PerIp(2)));
        let _three = gate.admit(b, 1024).expect("another address");
        assert_eq!(gate.admit(b, 1024).err(), Some(Refused::Full(3)));
        drop(one);
        assert!(gate.admit(a, 1024).is_ok(), "a freed place is taken again");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut bucket = Bucket::new(1.0, 3.0);
        assert!(bucket.take(1.0) && bucket.take(1.0) && bucket.take(1.0));
        assert!(!bucket.take(1.0), "the burst is spent");
    }

    #[test]
    fn http_requests_get_two_seconds_worth_then_429_and_idle_addresses_are_forgotten() {
        let gate = Gate::new(Limits {
            http_requests_per_ip_per_sec: 1.0,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let ip = |n: u32| IpAddr::from(n.to_be_bytes());
        assert!(gate.http_request_at(ip(0), t0) && gate.http_request_at(ip(0), t0));
        assert!(
            !gate.http_request_at(ip(0), t0),
            "two seconds' worth, then no more"
        );
        assert!(gate.http_request_at(ip(0), t0 + std::time::Duration::from_secs(1)));
        // Addresses that spent tokens are kept; once they refilled (were
        // idle), the next new address makes room by forgetting them.
        for n in 1..HTTP_ADDRESSES_KEPT as u32 + 1 {
            assert!(gate.http_request_at(ip(n), t0));
        }
        let held = || gate.http.lock().expect("lock").len();
        assert_eq!(held(), HTTP_ADDRESSES_KEPT + 1);
        assert!(gate.http_request_at(ip(u32::MAX), t0 + std::time::Duration::from_secs(10)));
        assert_eq!(held(), 1, "idle addresses forgotten");
    }

    #[test]
    fn a_connection_gets_its_bursts_of_messages_and_bytes_then_no_more() {
        let ip: IpAddr = "1.1.1.1".parse().expect("ip");
        let gate = Gate::new(Limits {
            messages_per_sec: 0.3,
            bytes_per_sec: 0.001,
            ..Limits::default()
        });
        // Ten seconds of 0.3 messages a second: three messages.
        let mut slot = gate.admit(ip, 100).expect("admitted");
        assert!(slot.allow(10) && slot.allow(10) && slot.allow(10));
        assert!(!slot.allow(10), "the message burst is spent");
        // The byte burst is at least one largest message.
        let mut slot = gate.admit(ip, 100).expect("admitted");
        assert!(slot.allow(100));
        assert!(!slot.allow(1), "the byte burst is spent");
        let mut slot = gate.admit(ip, 100).expect("admitted");
        assert!(!slot.allow(101), "more than the byte burst at once");
        assert!(slot.allow(100), "a refused message takes nothing");
    }
}
