//! Every advisory lock tenantd takes in PostgreSQL, in one place, so that no two uses share a
//! key by accident: each is a pair `(kind, key)`, the kind a four-letter tag as an `i32`.

/// A tenant's lock (`'tndt'`), its key `TenantId::lock_key`: every operation that changes the
/// tenant holds it from its first read to its last write.
pub const TENANT: i32 = 0x746e_6474;

/// A replay or a drop of a tenant's dead letters (`'tndl'`), its key `TenantId::lock_key`.
pub const DEAD_LETTERS: i32 = 0x746e_646c;

/// A replica's liveness lock (`'tndr'`), its key `replicas.lock_key`; the view `live_replicas`
/// in `schema.sql` names it too, as 1953391730.
pub const REPLICA: i32 = 0x746e_6472;

/// The sweep of orphan queues (`'tnds'`), key 0: one replica sweeps at a time.
pub const SWEEP: i32 = 0x746e_6473;

/// The schema's creation (`hashtext('tenantd.schema')`, one key): concurrent starts take turns.
pub const SCHEMA: &str = "tenantd.schema";
