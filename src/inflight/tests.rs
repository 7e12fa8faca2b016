//! The book against the real broker: what it acks when a burst of replies goes wrong midway.

use super::test_support::{self, Rig};
use crate::pool::{BatchDone, Item, Outcome, Poison};

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

/// Takes `bodies` into a book, each its own batch in the pool; `replies` makes what the workers
/// reply from the items. The replies are completed as one burst, then the session ends as a
/// drain ends it. Whether `complete` failed, and how many messages come back.
fn burst(bodies: &[&[u8]], replies: impl FnOnce(Vec<Item>) -> Vec<BatchDone>) -> (bool, u32) {
    let rig = Rig::holding(bodies);
    let consumer = rig.consume();
    let mut flight = rig.book(crossbeam_channel::unbounded().0, |_| {});
    rig.take(&consumer, &mut flight, bodies.len());
    let items = flight.hand_to_pool(bodies.len(), 0);
    let mut replies = replies(items).into_iter();
    flight.busy = replies.len();
    let first = replies.next().unwrap();
    let failed = flight.complete(&rig.channel, first, replies).is_err();
    flight.end(&rig.channel, []).unwrap();
    drop((consumer, flight));
    (failed, rig.end_and_count_back())
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

/// The ledger of dead letters fails (its server drops every connection): the first failed
/// message of a burst finds that out, and the others wait with it for the database's backoff,
/// unacked, rather than each trying the ledger in turn (a ledger that times out would hold the
/// tenant thread one connect timeout per message).
#[test]
fn the_failed_messages_of_a_burst_try_an_unavailable_ledger_once() {
    const FAILED: usize = 5;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://{}/ledger", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let rig = Rig::holding(&[&b"not JSON"[..]; FAILED]);
    let consumer = rig.consume();
    let mut flight = rig.book(crossbeam_channel::unbounded().0, |book| {
        book.retry_delays = Vec::new();
        book.ledger = test_support::ledger(&url);
    });
    rig.take(&consumer, &mut flight, FAILED);
    let failed = flight
        .hand_to_pool(FAILED, 1)
        .into_iter()
        .map(poison)
        .collect();
    flight
        .complete(&rig.channel, stored(&[], failed), [])
        .unwrap();
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(flight.waiting.len(), FAILED, "each failed message waits");
    drop((consumer, flight));
    assert_eq!(rig.end_and_count_back(), FAILED as u32);
}

/// A failed message waits for a ledger it cannot reach: each try fails, so its wait grows with
/// the database's backoff (50 ms doubling to 5 s), though its own batch, holding nothing but the
/// failed message, touched no database (its reply once reset the backoff, and the ledger was
/// tried some twenty times a second for as long as the database was away).
#[test]
fn a_dead_letter_waiting_for_an_unreachable_ledger_backs_off() {
    use std::time::{Duration, Instant};
    const TRIES: usize = 6;
    let rig = Rig::holding(&[&b"not JSON"[..]]);
    let consumer = rig.consume();
    // The rig's ledger is a port nothing listens on: every try is refused at once.
    let mut flight = rig.book(crossbeam_channel::unbounded().0, |book| {
        book.retry_delays = Vec::new();
    });
    rig.take(&consumer, &mut flight, 1);
    let mut waits = Vec::new();
    for _ in 0..TRIES {
        // The message goes to the pool again, alone, and comes back failed.
        let item = flight.hand_to_pool(1, 1).pop().expect("the message waits");
        flight
            .complete(&rig.channel, stored(&[], vec![poison(item)]), [])
            .unwrap();
        let at = flight
            .retry_at
            .expect("the ledger is unreachable: the message waits");
        waits.push(at.saturating_duration_since(Instant::now()));
        flight.retry_due();
    }
    drop((consumer, flight));
    assert_eq!(rig.end_and_count_back(), 1, "the message is not lost");
    // Doubling from 50 ms, the 6th wait is 1.6 s, 800 ms at least with the jitter; a wait that
    // does not grow stays near 50 ms.
    assert!(
        waits[TRIES - 1] >= Duration::from_millis(400),
        "the waits for the ledger do not grow: {waits:?}"
    );
}

/// A ledger whose server takes the connection and never answers (a stopped postmaster, a frozen
/// VM or pooler): the connect gives up within twice its timeout, the failed message waits for
/// the database's backoff, and what the burst committed is acked. The tenant thread is not held
/// (it would not hear a stop, the fence or a shutdown meanwhile).
#[test]
fn a_ledger_that_never_answers_does_not_hold_the_tenant_thread() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let silent = crate::store::Silent::start();
    let rig = Rig::holding(&[&b"{}"[..], &b"not JSON"[..]]);
    let consumer = rig.consume();
    let mut flight = rig.book(crossbeam_channel::unbounded().0, |book| {
        book.retry_delays = Vec::new();
        book.ledger = test_support::ledger(&silent.url);
    });
    rig.take(&consumer, &mut flight, 2);
    let mut items = flight.hand_to_pool(2, 1);
    let bad = items.pop().unwrap();
    // Should the connect wait for ever, the server lets go after 10 s, and the test fails.
    let (done, finished) = crossbeam_channel::bounded::<()>(1);
    let released = Arc::new(AtomicBool::new(false));
    let (release, said) = (silent.releaser(), released.clone());
    std::thread::spawn(move || {
        if finished.recv_timeout(Duration::from_secs(10)).is_err() {
            said.store(true, Ordering::SeqCst);
            release();
        }
    });
    flight
        .complete(&rig.channel, stored(&items, vec![poison(bad)]), [])
        .unwrap();
    let _ = done.send(());
    assert!(
        !released.load(Ordering::SeqCst),
        "the tenant thread was held until the silent server let go"
    );
    assert_eq!(flight.waiting.len(), 1, "the failed message waits");
    drop((consumer, flight));
    assert_eq!(
        rig.end_and_count_back(),
        1,
        "only the failed message comes back"
    );
}
