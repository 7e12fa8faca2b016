//! A tenant's book against the real broker, for the tests of the book and of the drain: a queue
//! holding given messages, a session consuming it, and what comes back once the session ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions, Publish,
    QueueDeclareOptions, QueueDeleteOptions,
};
use uuid::Uuid;

use super::{Book, InFlight, Item};
use crate::broker::{self, BrokerAddr, Publisher};
use crate::ids::TenantId;
use crate::metrics::Metrics;
use crate::pool::BatchDone;
use crate::stats::TenantStats;
use crate::store::dead_letters::Ledger;
use crate::store::DbSettings;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A new tenant's queue holding messages (no ids), and a session's channel (prefetch 10, confirms
/// on) to consume it; the tenant has no retry queue, so a failed message's retry copy is refused.
pub struct Rig {
    pub tenant: TenantId,
    admin: Connection,
    setup: Channel,
    session: Connection,
    pub channel: Channel,
}

impl Rig {
    pub fn holding(bodies: &[&[u8]]) -> Rig {
        let addr = broker_addr();
        let tenant = TenantId::from(Uuid::new_v4());
        let queue = tenant.queue_name();
        let mut admin = broker::connect(&addr, TIMEOUT, "tenantd test").unwrap();
        let setup = admin.open_channel(None).unwrap();
        setup
            .queue_declare(queue.as_str(), QueueDeclareOptions::default())
            .unwrap();
        for body in bodies {
            let publish = Publish::with_properties(body, queue.as_str(), AmqpProperties::default());
            setup.basic_publish("", publish).unwrap();
        }
        let mut session = broker::connect(&addr, TIMEOUT, "tenantd test").unwrap();
        let channel = session.open_channel(None).unwrap();
        channel.qos(0, 10, false).unwrap();
        Rig {
            tenant,
            admin,
            setup,
            session,
            channel,
        }
    }

    /// The book of a session on this channel: 4 batches at a time, retrying once (after a
    /// minute), its ledger of dead letters at `ledger` (a port nothing listens on unless
    /// `adjust` says otherwise).
    pub fn book(
        &self,
        reply: crossbeam_channel::Sender<BatchDone>,
        adjust: impl FnOnce(&mut Book),
    ) -> InFlight {
        let publisher = Publisher::enable(&self.channel, TIMEOUT).unwrap();
        let metrics = Metrics::new();
        let mut book = Book {
            tenant: self.tenant,
            workers: 4,
            batch_size: 1,
            retry_delays: vec![Duration::from_secs(60)],
            stats: Arc::new(TenantStats::new(self.tenant, &metrics)),
            ledger: ledger("postgres://127.0.0.1:1/unused"),
        };
        adjust(&mut book);
        InFlight::new(book, reply, publisher)
    }

    pub fn consume(&self) -> Consumer<'_> {
        self.channel
            .basic_consume(self.tenant.queue_name(), ConsumerOptions::default())
            .unwrap()
    }

    /// Takes `n` deliveries into the book.
    pub fn take(&self, consumer: &Consumer, flight: &mut InFlight, n: usize) {
        for _ in 0..n {
            match consumer.receiver().recv_timeout(TIMEOUT).unwrap() {
                ConsumerMessage::Delivery(d) => flight.accept([d]),
                other => panic!("expected a delivery, got {other:?}"),
            }
        }
    }

    /// Ends the session (what it left unacked goes back to the queue) and counts the messages
    /// back in the queue.
    pub fn end_and_count_back(self) -> u32 {
        let Rig {
            tenant,
            admin,
            setup,
            session,
            ..
        } = self;
        // The consumer may have been dropped before amiquip sent it its last message, which
        // fails the connection: what it left unacked is back all the same.
        let _ = session.close();
        let queue = tenant.queue_name();
        let deadline = Instant::now() + TIMEOUT;
        let back = loop {
            let q = setup.queue_declare_passive(queue.as_str()).unwrap();
            if q.declared_consumer_count() == Some(0) && q.declared_message_count() > Some(0) {
                break q.declared_message_count().unwrap();
            }
            assert!(Instant::now() < deadline, "the queue still has a consumer");
            std::thread::sleep(Duration::from_millis(20)); // polling, bounded by the deadline
        };
        let _ = setup.queue_delete(queue.as_str(), QueueDeleteOptions::default());
        let _ = admin.close();
        back
    }
}

/// A ledger of dead letters at `url`, with a connect timeout of 1 s.
pub fn ledger(url: &str) -> Arc<Ledger> {
    let settings = DbSettings {
        url: url.into(),
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::ZERO,
        keepalive: Duration::from_secs(10),
    };
    Arc::new(Ledger::new(settings, 1, Duration::from_secs(10)))
}

impl InFlight {
    /// Hands the first `items` that wait to the pool, as `batches` batches.
    pub fn hand_to_pool(&mut self, items: usize, batches: usize) -> Vec<Item> {
        self.busy += batches;
        self.waiting.drain(..items).collect()
    }
}

fn broker_addr() -> BrokerAddr {
    let url = std::env::var("TENANTD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    BrokerAddr::parse(&url).unwrap()
}
