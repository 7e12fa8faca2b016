//! Reading in pages: tenants in creation order, a tenant's messages oldest first, and every
//! tenant's messages tenant by tenant. Keyset pages with opaque cursors. A page of messages
//! holds at most `PAGE_PAYLOAD_BYTES` of payloads, so what a request thread builds and the HTTP
//! guard holds for a slow reader is bounded in bytes, not only in rows.

use postgres::Client;
use serde::Serialize;
use uuid::Uuid;

use super::{Service, ServiceError, ServiceResult};
use crate::cursor::{self, AllPosition};
use crate::ids::TenantId;
use crate::model::{StoredMessage, Tenant};
use crate::store::{messages, tenants};

/// At most this many tenants' partitions are read by one page of `/api/messages`.
const PARTITIONS_PER_PAGE: usize = 50;

/// The most payload bytes one page of messages holds (as PostgreSQL prints them); a page ends
/// before the message that would pass it, and says where to go on. A message larger than this
/// alone is shown on a page of its own without its payload, with its `payload_size`.
pub const PAGE_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
const PAGE_BYTES: i64 = PAGE_PAYLOAD_BYTES as i64;

#[derive(Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl Service {
    pub fn list_tenants(&self, cursor: Option<&str>, limit: usize) -> ServiceResult<Page<Tenant>> {
        let after = decode_cursor(cursor, cursor::decode)?;
        let mut rows = self.with_db(|db| {
            tenants::list(db, after, limit as i64 + 1).map_err(ServiceError::database)
        })?;
        let next = next_cursor(&mut rows, limit, |t| cursor::encode((t.created_at, t.id)));
        Ok(Page {
            data: rows,
            next_cursor: next,
        })
    }

    pub fn tenant_messages(
        &self,
        id: TenantId,
        cursor: Option<&str>,
        limit: usize,
    ) -> ServiceResult<Page<StoredMessage>> {
        let after = decode_cursor(cursor, cursor::decode)?;
        self.with_db(|db| {
            self.tenant(db, id)?;
            let rows = messages::page(db, id, after, limit as i64 + 1, PAGE_BYTES)
                .map_err(ServiceError::database)?;
            let (mut rows, cut) = fit(rows, true);
            let next = match cut {
                true => rows.last().map(|m| cursor::encode((m.created_at, m.id))),
                false => next_cursor(&mut rows, limit, |m| cursor::encode((m.created_at, m.id))),
            };
            Ok(Page {
                data: rows,
                next_cursor: next,
            })
        })
    }

    /// Pages over every tenant's messages: tenant by tenant in id order, each oldest first;
    /// with `only`, the same walk restricted to that tenant (the cursor is a position in the
    /// walk either way). One page reads at most `PARTITIONS_PER_PAGE` partitions, one at a
    /// time, so its cost and its locks do not grow with the number of tenants; a page may then
    /// be short, with a cursor.
    pub fn all_messages(
        &self,
        cursor: Option<&str>,
        limit: usize,
        only: Option<TenantId>,
    ) -> ServiceResult<Page<StoredMessage>> {
        let position = decode_cursor(cursor, cursor::decode_all)?;
        self.with_db(|db| {
            if let Some(id) = only {
                self.tenant(db, id)?;
            }
            let walk = Walk {
                only: only.map(TenantId::uuid),
            };
            walk.page(db, position, limit)
        })
    }
}

/// The walk over every tenant's partition in tenant id order, or over one tenant's alone.
struct Walk {
    only: Option<Uuid>,
}

impl Walk {
    /// The tenant after `after` in the walk.
    fn next_tenant(&self, db: &mut Client, after: Option<Uuid>) -> ServiceResult<Option<Uuid>> {
        match self.only {
            Some(only) => Ok(after.is_none_or(|a| a < only).then_some(only)),
            None => next_tenant(db, after),
        }
    }

    /// Where a position lands in this walk: inside the tenant, before it, or past it.
    fn clamp(&self, position: Option<AllPosition>) -> Option<AllPosition> {
        let (Some(only), Some(AllPosition::Within(t, p))) = (self.only, position) else {
            return position;
        };
        match t.cmp(&only) {
            std::cmp::Ordering::Equal => Some(AllPosition::Within(t, p)),
            std::cmp::Ordering::Less => None,
            std::cmp::Ordering::Greater => Some(AllPosition::After(t)),
        }
    }

    fn page(
        &self,
        db: &mut Client,
        position: Option<AllPosition>,
        limit: usize,
    ) -> ServiceResult<Page<StoredMessage>> {
        walk_all(db, self.clamp(position), limit, self)
    }
}

fn walk_all(
    db: &mut Client,
    mut position: Option<AllPosition>,
    limit: usize,
    walk: &Walk,
) -> ServiceResult<Page<StoredMessage>> {
    let mut data = Vec::with_capacity(limit);
    let mut bytes: i64 = 0;
    for _ in 0..PARTITIONS_PER_PAGE {
        let (tenant, after) = match position {
            Some(AllPosition::Within(t, p)) => (t, Some(p)),
            Some(AllPosition::After(t)) => match walk.next_tenant(db, Some(t))? {
                Some(next) => (next, None),
                None => return Ok(end(data)),
            },
            None => match walk.next_tenant(db, None)? {
                Some(first) => (first, None),
                None => return Ok(end(data)),
            },
        };
        let want = limit - data.len();
        let rows = messages::page(
            db,
            tenant.into(),
            after,
            want as i64 + 1,
            PAGE_BYTES - bytes,
        )
        .map_err(ServiceError::database)?;
        let fetched = rows.len();
        let (mut rows, cut) = fit(rows, data.is_empty());
        if cut || fetched > want {
            rows.truncate(want);
            // The page ends in this tenant: after its last row shown, or before the tenant
            // when none was.
            let next = match rows.last() {
                Some(last) => Some(AllPosition::Within(tenant, (last.created_at, last.id))),
                None => position,
            };
            data.extend(rows);
            return Ok(Page {
                data,
                next_cursor: next.map(cursor::encode_all),
            });
        }
        bytes += rows.iter().map(|m| m.size).sum::<i64>();
        data.extend(rows);
        position = Some(AllPosition::After(tenant));
        if data.len() == limit {
            break;
        }
    }
    let next = match position {
        Some(AllPosition::After(t)) if walk.next_tenant(db, Some(t))?.is_none() => None,
        p => p.map(cursor::encode_all),
    };
    Ok(Page {
        data,
        next_cursor: next,
    })
}

/// The rows whose payloads came (those within the page's bytes), and whether one was left out
/// for its size. The first row of a page stays even without its payload (larger than a whole
/// page), with its `payload_size`, so that every page moves on.
fn fit(rows: Vec<StoredMessage>, first_of_page: bool) -> (Vec<StoredMessage>, bool) {
    let mut kept = Vec::with_capacity(rows.len());
    for (i, mut row) in rows.into_iter().enumerate() {
        if row.payload.is_none() {
            if i == 0 && first_of_page {
                row.payload_size = Some(row.size);
                kept.push(row);
            }
            return (kept, true);
        }
        kept.push(row);
    }
    (kept, false)
}

fn end(data: Vec<StoredMessage>) -> Page<StoredMessage> {
    Page {
        data,
        next_cursor: None,
    }
}

fn next_tenant(db: &mut Client, after: Option<Uuid>) -> ServiceResult<Option<Uuid>> {
    tenants::ids_after(db, after, 1)
        .map(|ids| ids.into_iter().next())
        .map_err(ServiceError::database)
}

fn decode_cursor<T>(
    cursor: Option<&str>,
    decode: fn(&str) -> Option<T>,
) -> ServiceResult<Option<T>> {
    match cursor {
        None | Some("") => Ok(None),
        Some(c) => decode(c)
            .map(Some)
            .ok_or_else(|| ServiceError::Invalid("invalid cursor".into())),
    }
}

/// Trims the one extra row fetched to learn whether another page exists.
fn next_cursor<T>(
    rows: &mut Vec<T>,
    limit: usize,
    encode: impl Fn(&T) -> String,
) -> Option<String> {
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(encode)
}
