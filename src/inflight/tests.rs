//! The book against the real broker: what it acks when a burst of replies goes wrong midway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, ConsumerMessage, ConsumerOptions, Publish, QueueDeclareOptions,
    QueueDeleteOptions,
};
use uuid::Uuid;

use super::{Book, InFlight};
use crate::broker::{self, BrokerAddr, Publisher};
use crate::ids::TenantId;
use crate::metrics::Metrics;
use crate::pool::{BatchDone, Item, Outcome, Poison};
use crate::stats::TenantStats;
use crate::store::dead_letters::Ledger;
use crate::store::DbSettings;

const TIMEOUT: Duration = Duration::from_secs(5);

fn broker_addr() -> BrokerAddr {
    let url = std::env::var("TENANTD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    BrokerAddr::parse(&url).unwrap()
}

/// Two replies wait when the tenant thread wakes: the first committed a message, the second
/// holds a poison message whose copy the broker refuses (no retry queue to route it to). The
/// session ends on that error; the committed message must have been acked, so only the poison
/// message comes back.
#[test]
fn a_reply_that_fails_midway_through_a_burst_still_acks_what_committed_before_it() {
    let (failed, back) = burst(&[b"{}", b"not JSON"], |mut items| {
        let bad = items.pop().unwrap();
        vec![stored(&items, vec![]), stored(&[], vec![poison(bad)])]
    });
    assert!(failed, "the copy has no queue to go to");
    assert_eq!(
        back, 1,
        "only the poison message comes back, not the committed one"
    );
}

/// The refused reply comes first in the burst: the replies after it are still taken, and what
/// they committed is acked.
#[test]
fn a_refused_copy_first_in_a_burst_still_acks_what_the_next_replies_committed() {
    let (failed, back) = burst(&[b"not JSON", b"{}"], |mut items| {
        let good = items.pop().unwrap();
        let bad = items.pop().unwrap();
        vec![stored(&[], vec![poison(bad)]), stored(&[good], vec![])]
    });
    assert!(failed, "the copy has no queue to go to");
    assert_eq!(
        back, 1,
        "only the poison message comes back, not the committed one"
    );
}

/// One batch committed some messages and failed one, whose copy is refused: the commit holds.
#[test]
fn a_refused_copy_does_not_hold_back_the_commit_of_its_own_batch() {
    let (failed, back) = burst(&[b"{}", b"not JSON", b"{}"], |mut items| {
        let bad = items.remove(1);
        vec![stored(&items, vec![poison(bad)])]
    });
    assert!(failed, "the copy has no queue to go to");
    assert_eq!(
        back, 1,
        "only the poison message comes back, not the committed ones"
    );
}

/// The refused message is the lowest unacked delivery, so no `ack_multiple` reaches past it:
/// the session's end acks the committed ones above it one by one.
#[test]
fn what_committed_past_a_message_left_unacked_is_acked_when_the_session_ends() {
    let (failed, back) = burst(&[b"not JSON", b"{}", b"{}"], |mut items| {
        let bad = items.remove(0);
        vec![stored(&[], vec![poison(bad)]), stored(&items, vec![])]
    });
    assert!(failed, "the copy has no queue to go to");
    assert_eq!(
        back, 1,
        "only the poison message comes back, not the committed ones"
    );
}

/// Publishes `bodies` to a new queue and takes them into a book, each its own batch in the
/// pool; `replies` makes what the workers reply from the items. The replies are completed as one
/// burst, then the session ends as a drain ends it. Whether `complete` failed, and how many
/// messages come back.
fn burst(bodies: &[&[u8]], replies: impl FnOnce(Vec<Item>) -> Vec<BatchDone>) -> (bool, u32) {
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
    let publisher = Publisher::enable(&channel, TIMEOUT).unwrap();
    let consumer = channel
        .queue_declare_passive(queue.as_str())
        .unwrap()
        .consume(ConsumerOptions::default())
        .unwrap();
    let mut flight = book(tenant, publisher);
    for _ in bodies {
        match consumer.receiver().recv_timeout(TIMEOUT).unwrap() {
            ConsumerMessage::Delivery(d) => flight.accept([d]),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    let items: Vec<Item> = flight.waiting.drain(..).collect();
    let mut replies = replies(items).into_iter();
    flight.busy = replies.len();
    let first = replies.next().unwrap();
    let failed = flight.complete(&channel, first, replies).is_err();
    flight.ack_every_committed(&channel).unwrap();
    // The session ends, as the event loop ends it on this error.
    drop((consumer, flight));
    session.close().unwrap();

    let back = ready_once_unconsumed(&setup, &queue);
    let _ = setup.queue_delete(queue.as_str(), QueueDeleteOptions::default());
    let _ = admin.close();
    (failed, back)
}

fn stored(items: &[Item], poison: Vec<Poison>) -> BatchDone {
    BatchDone {
        poison,
        outcome: Outcome::Stored {
            settled: items.iter().map(|i| i.tag).collect(),
            inserted: items.len() as u64,
        },
    }
}

fn poison(item: Item) -> Poison {
    Poison {
        tag: item.tag,
        id: item.id,
        body: item.body,
        reason: "message is not JSON".into(),
    }
}

fn book(tenant: TenantId, publisher: Publisher) -> InFlight {
    let metrics = Metrics::new();
    let book = Book {
        tenant,
        workers: 2,
        batch_size: 1,
        retry_delays: vec![Duration::from_secs(60)],
        stats: Arc::new(TenantStats::new(tenant, &metrics)),
        // Retries only: the ledger of dead letters is never reached.
        ledger: Arc::new(Ledger::new(
            DbSettings {
                url: "postgres://127.0.0.1:1/unused".into(),
                connect_timeout: Duration::from_secs(1),
                statement_timeout: Duration::ZERO,
                keepalive: Duration::from_secs(10),
            },
            1,
            Duration::from_secs(10),
        )),
    };
    InFlight::new(book, crossbeam_channel::unbounded().0, publisher)
}

/// The queue's ready messages once it has no consumer (what the closed session left unacked
/// is back by then).
fn ready_once_unconsumed(channel: &Channel, queue: &str) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let q = channel.queue_declare_passive(queue).unwrap();
        if q.declared_consumer_count() == Some(0) && q.declared_message_count() > Some(0) {
            return q.declared_message_count().unwrap();
        }
        assert!(Instant::now() < deadline, "the queue still has a consumer");
        std::thread::sleep(Duration::from_millis(20)); // polling, bounded by the deadline
    }
}
