//! The end of a drain: replies that say "committed" and already wait when the drain's deadline
//! passes or the fence fires are acked too (left unacked, their messages would come again and,
//! without a UUID `message_id`, be stored twice).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;

use super::drain::drain;
use super::{Control, FenceClock, Leave, Session};
use crate::health::Health;
use crate::inflight::test_support::Rig;
use crate::pool::{BatchDone, Outcome};

/// `select!` picks at random among ready arms: with the ending arm ready from the start, a
/// drain that ignored waiting replies would lose them in about half of the trials.
const TRIALS: usize = 12;

#[derive(Clone, Copy)]
enum End {
    /// A stop whose deadline has passed (a stop by `Instant::now()`: the fence's, the heart's,
    /// a closed control channel).
    Deadline,
    /// The fence fires while the drain waits (its deadline far away).
    Fence,
}

#[test]
fn replies_already_waiting_when_the_drain_deadline_passes_are_acked() {
    assert_every_trial_acks(End::Deadline);
}

#[test]
fn replies_already_waiting_when_the_fence_ends_the_drain_are_acked() {
    assert_every_trial_acks(End::Fence);
}

fn assert_every_trial_acks(end: End) {
    let back: Vec<u32> = (0..TRIALS).map(|_| committed_back(end)).collect();
    assert!(
        back.iter().all(|&n| n == 0),
        "committed deliveries came back in {} of {TRIALS} trials: {back:?}",
        back.iter().filter(|&&n| n > 0).count()
    );
}

/// Takes 4 messages, puts 3 in the pool and queues a committed reply for each, then drains as a
/// stop by a passed deadline or by the fence does. The 4th never commits and comes back. How
/// many committed deliveries came back with it.
fn committed_back(end: End) -> u32 {
    const COMMITTED: usize = 3;
    let rig = Rig::holding(&[b"{}"; COMMITTED + 1].map(|b| &b[..]));
    let consumer = rig.consume();
    let (reply_tx, replies) = unbounded::<BatchDone>();
    let mut flight = rig.book(reply_tx.clone(), |_| {});
    rig.take(&consumer, &mut flight, COMMITTED + 1);
    let items = flight.hand_to_pool(COMMITTED, COMMITTED);
    for item in items {
        let settled = vec![item.tag];
        let outcome = Outcome::Stored {
            settled,
            inserted: 1,
        };
        let done = BatchDone {
            poison: Vec::new(),
            outcome,
        };
        reply_tx.send(done).unwrap();
    }

    let (_control_tx, control) = unbounded::<Control>();
    let session = Session {
        channel: &rig.channel,
        consumer: &consumer,
        replies: &replies,
        control: &control,
    };
    let now = Instant::now();
    let (stop_by, fence_after) = match end {
        End::Deadline => (now, Duration::from_secs(3600)),
        End::Fence => (now + Duration::from_secs(60), Duration::ZERO),
    };
    let fence = FenceClock {
        health: Arc::new(Health::default()),
        after: fence_after,
    };
    let (mut leave, mut deadline) = (Leave::Stop(stop_by), stop_by);
    drain(&session, &mut flight, &mut leave, &mut deadline, &fence).unwrap();
    // Dropped at once: the drain took the consumer's last message, so this cannot fail the
    // connection before the acks are written.
    drop((consumer, flight));
    rig.end_and_count_back() - 1
}
