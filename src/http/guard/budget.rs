//! The guard's shared budgets (request bodies, responses held for slow readers; connections are
//! counted the same way in `admission`), shared fairly among client addresses: an address may
//! hold at most half of what the other addresses leave. So no address can take a budget whole,
//! and whoever comes next finds room, however many connections one address opens.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;
use prometheus::IntGauge;

/// Who a budget is shared among: an IPv4 address, or the /64 an IPv6 address belongs to (one
/// host is given a /64 and picks addresses in it at will).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !(u128::from(u64::MAX));
                ClientKey(IpAddr::V6(prefix.into()))
            }
            v4 => ClientKey(v4),
        }
    }
}

impl ClientKey {
    /// The address (for IPv6, its /64 with the host bits zero).
    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(prefix) => write!(f, "{prefix}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// The most one client may hold of `total` while the others hold `others`: half of what they
/// leave, rounded up (so a budget of 1 still admits someone).
pub fn fair_share(total: usize, others: usize) -> usize {
    total.saturating_sub(others).div_ceil(2)
}

/// Bytes of one kind the guard holds, at most `total`, shared by `fair_share`.
pub struct Budget {
    total: usize,
    held: Mutex<Held>,
    /// Every byte held, within the budget or not (see `hold_free`).
    gauge: IntGauge,
}

#[derive(Default)]
struct Held {
    sum: usize,
    by_client: HashMap<ClientKey, usize>,
}

/// Bytes taken from a budget, given back when dropped.
pub struct Reservation<'a> {
    budget: &'a Budget,
    client: ClientKey,
    bytes: usize,
    /// Counted in the budget (else only in the gauge).
    counted: bool,
}

impl Budget {
    pub fn new(total: usize, gauge: IntGauge) -> Budget {
        Budget {
            total,
            held: Mutex::new(Held::default()),
            gauge,
        }
    }

    /// `bytes` for `client`, or `None` when that would pass its fair share.
    pub fn take(&self, client: ClientKey, bytes: usize) -> Option<Reservation<'_>> {
        let mut held = self.held.lock();
        let mine = held.by_client.get(&client).copied().unwrap_or(0);
        if bytes > 0 && mine + bytes > fair_share(self.total, held.sum - mine) {
            return None;
        }
        held.sum += bytes;
        *held.by_client.entry(client).or_default() += bytes;
        self.gauge.add(bytes as i64);
        Some(Reservation {
            budget: self,
            client,
            bytes,
            counted: true,
        })
    }

    /// Bytes held outside the budget (bounded another way), counted in the gauge alone.
    pub fn hold_free(&self, client: ClientKey, bytes: usize) -> Reservation<'_> {
        self.gauge.add(bytes as i64);
        Reservation {
            budget: self,
            client,
            bytes,
            counted: false,
        }
    }

    fn give_back(&self, client: ClientKey, bytes: usize) {
        let mut held = self.held.lock();
        held.sum -= bytes;
        if let Some(mine) = held.by_client.get_mut(&client) {
            *mine -= bytes;
            if *mine == 0 {
                held.by_client.remove(&client);
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.budget.give_back(self.client, self.bytes);
        }
        self.budget.gauge.sub(self.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str) -> ClientKey {
        ClientKey::of(ip.parse().unwrap())
    }

    #[test]
    fn an_address_takes_half_of_what_others_leave_and_others_always_find_room() {
        let budget = Budget::new(64, IntGauge::new("g", "g").unwrap());
        let (a, b, c) = (key("127.0.0.2"), key("127.0.0.1"), key("10.0.0.3"));
        let held_by_a: Vec<_> = std::iter::from_fn(|| budget.take(a, 1)).collect();
        assert_eq!(held_by_a.len(), 32, "alone, half");
        let held_by_b: Vec<_> = std::iter::from_fn(|| budget.take(b, 1)).collect();
        assert_eq!(held_by_b.len(), 16, "half of what a leaves");
        let held_by_c = budget.take(c, 8);
        assert!(held_by_c.is_some(), "room for a third");
        assert!(budget.take(a, 1).is_none(), "a is past its share now");
        drop(held_by_a);
        assert_eq!(budget.gauge.get(), 16 + 8);
        assert!(budget.take(a, 16).is_some());
        assert_eq!(fair_share(1, 0), 1, "a budget of one admits someone");
        assert_eq!(fair_share(8, 8), 0);
    }

    #[test]
    fn ipv6_hosts_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:127.0.0.2"), key("127.0.0.2"));
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn free_bytes_count_in_the_gauge_only() {
        let budget = Budget::new(4, IntGauge::new("g", "g").unwrap());
        let free = budget.hold_free(key("127.0.0.1"), 100);
        assert_eq!(budget.gauge.get(), 100);
        assert!(budget.take(key("127.0.0.1"), 2).is_some());
        drop(free);
        assert_eq!(budget.gauge.get(), 0);
    }
}
