//! The integration tests: one binary, the real tenantd against the real PostgreSQL and RabbitMQ.

mod auth;
mod auth_setup;
mod cli;
mod cluster;
mod contract;
mod dead_letters;
mod delivery;
mod deploy;
mod fairness;
mod fencing;
mod front;
mod ingest;
mod install;
mod lifecycle;
mod limits;
mod metrics;
mod pagination;
mod races;
mod recovery;
mod replay;
mod replicas;
mod soak;
mod startup;
mod support;
mod tenants;
