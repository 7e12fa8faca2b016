//! Opaque page cursors: a position in a keyset order, printed so that clients need not (and
//! should not) read it, and parsed strictly so a damaged one is a 400, not a wrong page.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A position in `(created_at, id)` order.
pub type Position = (DateTime<Utc>, Uuid);

pub fn encode(position: Position) -> String {
    format!("{}.{}", position.0.timestamp_micros(), position.1.simple())
}

pub fn decode(cursor: &str) -> Option<Position> {
    let (micros, id) = cursor.split_once('.')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, Uuid::try_parse(id).ok()?))
}

/// A position in the walk over all tenants: inside a tenant's messages, or past a whole tenant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AllPosition {
    Within(Uuid, Position),
    After(Uuid),
}

pub fn encode_all(position: AllPosition) -> String {
    match position {
        AllPosition::Within(tenant, p) => format!("m.{}.{}", tenant.simple(), encode(p)),
        AllPosition::After(tenant) => format!("t.{}", tenant.simple()),
    }
}

pub fn decode_all(cursor: &str) -> Option<AllPosition> {
    if let Some(rest) = cursor.strip_prefix("m.") {
        let (tenant, position) = rest.split_once('.')?;
        return Some(AllPosition::Within(
            Uuid::try_parse(tenant).ok()?,
            decode(position)?,
        ));
    }
    let tenant = cursor.strip_prefix("t.")?;
    Some(AllPosition::After(Uuid::try_parse(tenant).ok()?))
}

/// A position in a list read from its start every time (the dead letters): how many come
/// before it.
pub fn encode_offset(skip: u64) -> String {
    format!("o{skip}")
}

pub fn decode_offset(cursor: &str) -> Option<u64> {
    let digits = cursor.strip_prefix('o')?;
    let canonical = !digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit());
    canonical.then(|| digits.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = (
            DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            Uuid::now_v7(),
        );
        assert_eq!(decode(&encode(p)), Some(p));
        let all = AllPosition::Within(Uuid::new_v4(), p);
        assert_eq!(decode_all(&encode_all(all)), Some(all));
        let after = AllPosition::After(Uuid::new_v4());
        assert_eq!(decode_all(&encode_all(after)), Some(after));
        assert_eq!(decode_offset(&encode_offset(40)), Some(40));
    }

    #[test]
    fn refuses_damage() {
        for bad in ["", "x", "1.", ".abc", "1.zz", "m.1", "t.", "q.1.2"] {
            assert_eq!(decode(bad), None, "{bad}");
            assert_eq!(decode_all(bad), None, "{bad}");
            assert_eq!(decode_offset(bad), None, "{bad}");
        }
        for bad in ["o", "o0", "o01", "o-1", "o1x", "o99999999999999999999999"] {
            assert_eq!(decode_offset(bad), None, "{bad}");
        }
    }
}
