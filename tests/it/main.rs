//! The integration tests: one binary, the real tenantd against the real PostgreSQL and RabbitMQ.
//!
//! Several modules meet the same machinery from different sides: `races` holds two requests on
//! one replica, `replicas` several replicas sharing tenants, `fencing` the coordinator's timing
//! against its fence, `recovery` a broker or database that refuses or stalls, and `soak` all the
//! faults in turn against three replicas.

/// A tenant's token reaches its own tenant alone; bad tokens get 401, never reach a log.
mod auth;
/// What an operator sets up for access: minted tokens, unusable keys, broker users per tenant.
mod auth_setup;
/// The binary as an operator runs it: `--help`, start-up errors, SIGTERM; the README's settings.
mod cli;
/// Quorum queues, and a RabbitMQ cluster losing a node under load: nothing lost or doubled.
mod cluster;
/// The OpenAPI document names exactly the routes, and responses carry exactly its fields.
mod contract;
/// Dead letters looked at without being taken, a page at a time, and dropped.
mod dead_letters;
/// Retries then dead-lettering with the reason; outages and kills under load lose nothing.
mod delivery;
/// The compose file and the scripts as written: nothing published beyond this host.
mod deploy;
/// A drain under way ends at the fence, acking nothing uncommitted.
mod drain_fence;
/// A batch submitted while the pool is busy runs before the busy tenant's queued ones.
mod fairness;
/// Gray failures of a replica (stopped, cut from the broker, mixed timeouts, a cold start):
/// no tenant stranded, nothing stored twice.
mod faults;
/// The fence covers every consumer the replica starts, and hand-overs keep heartbeating.
mod fencing;
/// The HTTP front: token auth, request ids, media types.
mod front;
/// Published messages become rows of the tenant's partition, once each.
mod ingest;
/// The Debian package, its systemd unit, service-manager notifications, `tenantd check`.
mod install;
/// Each poison message is dead-lettered once, whatever copies of it come back.
mod letters_once;
/// Delete, pause, resume and resize while messages flow: nothing lost, nothing doubled.
mod lifecycle;
/// One client cannot starve the others: slow readers, trickled bodies, rates per credential.
mod limits;
/// `/metrics`: the series an operator scrapes, valid by `promtool check metrics`.
mod metrics;
/// The queues of an interrupted create are swept after a grace; a tenant's never are.
mod orphans;
/// Cursor pages: every row exactly once, in `(created_at, id)` order, ties included.
mod pagination;
/// Two requests on one tenant, raced: GET tells the truth after, a delete leaves nothing.
mod races;
/// Consumers facing a refusing broker or a stalling database retry, and readiness says so.
mod recovery;
/// A session's order: the relay before the gate, the tenant's queue consumed by name; a missing
/// retry queue stores nothing twice; queues of a gone tenant never come back.
mod relay_start;
/// Replaying dead letters: each stored once, also across a SIGKILL; one replay at a time.
mod replay;
/// Replicas as child processes: even shares, take-over on death or SIGTERM, joins.
mod replicas;
/// Every fault kind once against three replicas on private servers, with the soak's goals.
mod soak;
/// Tenants started together: claim waves do not spin on refused claims; the gate keeps the fence.
mod start_gate;
/// A replica starting beside running ones reads the catalog and locks nothing they write.
mod startup;
/// The harness: the app in-process or as children, proxies, logs, vhosts, deadline waits.
mod support;
/// Creating and reading tenants, the seed's three checks, and every malformed request.
mod tenants;
