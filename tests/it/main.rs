//! The integration tests: one binary, the real tenantd against the real PostgreSQL and RabbitMQ.

mod cli;
mod contract;
mod delivery;
mod front;
mod ingest;
mod lifecycle;
mod metrics;
mod pagination;
mod races;
mod recovery;
mod startup;
mod support;
mod tenants;
