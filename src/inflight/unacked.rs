//! The deliveries of one channel that are not acked yet, in tag order: each added at the back
//! and settled from the front in O(1), where an ordered map shifted its neighbours (whole
//! `Delivery` values) on every insert and removal.

use std::collections::VecDeque;

/// Values (deliveries) neither acked nor rejected, ordered by tag (a channel's tags only grow).
pub struct Unacked<T> {
    entries: VecDeque<Entry<T>>,
}

struct Entry<T> {
    tag: u64,
    value: T,
    committed: bool,
}

impl<T> Default for Unacked<T> {
    fn default() -> Self {
        Unacked {
            entries: VecDeque::new(),
        }
    }
}

impl<T> Unacked<T> {
    /// Adds a delivery; a tag lower than the last (never seen from a broker) is still kept in
    /// order.
    pub fn push(&mut self, tag: u64, value: T) {
        let at = match self.entries.back() {
            Some(last) if last.tag > tag => self.entries.partition_point(|e| e.tag < tag),
            _ => self.entries.len(),
        };
        let entry = Entry {
            tag,
            value,
            committed: false,
        };
        self.entries.insert(at, entry);
    }

    /// Marks these deliveries as committed to the database; tags not held are ignored.
    pub fn commit(&mut self, tags: impl IntoIterator<Item = u64>) {
        for tag in tags {
            if let Some(i) = self.position(tag) {
                self.entries[i].committed = true;
            }
        }
    }

    /// Takes a delivery out (it is to be acked on its own, once its copy is elsewhere).
    pub fn remove(&mut self, tag: u64) -> Option<T> {
        let i = self.position(tag)?;
        self.entries.remove(i).map(|e| e.value)
    }

    /// Takes the longest run of committed deliveries at the low end and returns its last: one
    /// `ack_multiple` on it settles the whole run.
    pub fn take_committed_run(&mut self) -> Option<T> {
        let mut last = None;
        while self.entries.front().is_some_and(|e| e.committed) {
            last = self.entries.pop_front().map(|e| e.value);
        }
        last
    }

    /// Takes every committed delivery, also those past one that will not commit (a message
    /// whose copy was refused, a batch put back while the database fails): a session that ends
    /// acks each of them, or they would come again and be stored twice.
    pub fn take_every_committed(&mut self) -> Vec<T> {
        let (committed, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition::<VecDeque<_>, _>(|e| e.committed);
        self.entries = kept;
        committed.into_iter().map(|e| e.value).collect()
    }

    fn position(&self, tag: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&tag, |e| e.tag).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(tags: &[u64]) -> Unacked<u64> {
        let mut book = Unacked::default();
        for &tag in tags {
            book.push(tag, tag);
        }
        book
    }

    #[test]
    fn only_the_committed_run_at_the_low_end_is_taken() {
        let mut book = holding(&[1, 2, 3, 4]);
        book.commit([2, 3]);
        assert_eq!(book.take_committed_run(), None, "1 is not committed");
        book.commit([1]);
        assert_eq!(book.take_committed_run(), Some(3));
        assert_eq!(book.take_committed_run(), None, "4 is not committed");
        book.commit([4]);
        assert_eq!(book.take_committed_run(), Some(4));
    }

    #[test]
    fn a_removed_delivery_does_not_hold_the_run_back_and_can_be_put_back() {
        let mut book = holding(&[1, 2, 3]);
        assert_eq!(book.remove(2), Some(2));
        assert_eq!(book.remove(2), None);
        book.commit([1, 3]);
        assert_eq!(book.take_committed_run(), Some(3));

        let mut book = holding(&[1, 2, 3]);
        let two = book.remove(2).unwrap();
        book.push(2, two);
        book.commit([1, 3]);
        assert_eq!(
            book.take_committed_run(),
            Some(1),
            "2 is back and not committed"
        );
    }

    #[test]
    fn unknown_tags_are_ignored_and_out_of_order_tags_kept_in_order() {
        let mut book = holding(&[5, 3, 4]);
        book.commit([9, 3, 4]);
        assert_eq!(book.take_committed_run(), Some(4));
        book.commit([5]);
        assert_eq!(book.take_committed_run(), Some(5));
        assert_eq!(book.take_committed_run(), None);
    }

    #[test]
    fn a_delivery_put_back_at_the_low_end_holds_the_run_until_committed() {
        let mut book = holding(&[1, 2, 3]);
        let one = book.remove(1).unwrap();
        book.commit([2, 3]);
        book.push(1, one);
        assert_eq!(book.take_committed_run(), None);
        book.commit([1]);
        assert_eq!(book.take_committed_run(), Some(3));
        assert_eq!(book.take_committed_run(), None);
    }

    #[test]
    fn every_committed_delivery_is_taken_past_one_that_is_not() {
        let mut book = holding(&[1, 2, 3, 4, 5]);
        book.commit([2, 4, 5]);
        assert_eq!(book.take_committed_run(), None, "1 is not committed");
        assert_eq!(book.take_every_committed(), vec![2, 4, 5]);
        assert_eq!(book.take_every_committed(), Vec::<u64>::new());
        book.commit([1, 3]);
        assert_eq!(book.take_committed_run(), Some(3), "1 and 3 are still held");
    }

    /// Random pushes, commits, removals, put-backs and runs against the ordered map and set
    /// the book replaced: the same runs, the same deliveries.
    #[test]
    fn it_settles_as_an_ordered_map_and_set_would() {
        use std::collections::{BTreeMap, BTreeSet};
        let mut seed = 0x1234_5678_u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut book = Unacked::default();
        let mut map: BTreeMap<u64, u64> = BTreeMap::new();
        let mut committed: BTreeSet<u64> = BTreeSet::new();
        let mut next = 1_u64;
        for _ in 0..200_000 {
            let tag = random() % next + 1;
            match random() % 5 {
                0 | 1 => {
                    book.push(next, next);
                    map.insert(next, next);
                    next += 1;
                }
                2 => {
                    book.commit([tag]);
                    if map.contains_key(&tag) {
                        committed.insert(tag);
                    }
                }
                3 => {
                    let removed = book.remove(tag);
                    assert_eq!(removed, map.remove(&tag));
                    committed.remove(&tag);
                    if let Some(value) = removed.filter(|_| random() % 2 == 0) {
                        book.push(tag, value);
                        map.insert(tag, value);
                    }
                }
                _ => {
                    let mut last = None;
                    while let Some(entry) = map.first_entry() {
                        if !committed.remove(entry.key()) {
                            break;
                        }
                        last = Some(entry.remove());
                    }
                    assert_eq!(book.take_committed_run(), last);
                }
            }
            assert_eq!(book.entries.len(), map.len());
        }
    }
}
