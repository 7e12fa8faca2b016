//! The nouns the API and the store share: a tenant, its status, its consumer, its messages.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::TenantId;

/// What a tenant should be doing. `Deleting` is set by DELETE and seen only until it finishes
/// (or after a DELETE that failed midway, which a repeated DELETE completes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
    Deleting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
            Status::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "inactive" => Some(Status::Inactive),
            "deleting" => Some(Status::Deleting),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
    pub workers: u16,
    /// Grows with every change of `status` or `workers`; the consumer reports the one it applied.
    #[serde(skip)]
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The live consumer of the tenant, on whichever replica runs it; `None` when none does.
    pub consumer: Option<ConsumerInfo>,
}

impl Tenant {
    pub fn tenant_id(&self) -> TenantId {
        TenantId::from(self.id)
    }
}

/// How a replica's consumer of a tenant is doing, as that replica last reported it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub replica: String,
    /// `starting`, `running`, `retrying` (it cannot connect: `error` says why) or `stopping`.
    pub state: String,
    /// The concurrency the running consumer applies (its prefetch is workers × BATCH_SIZE).
    pub workers: Option<u16>,
    #[serde(skip)]
    pub version: i64,
    pub error: Option<String>,
    pub since: DateTime<Utc>,
}

/// A message as stored and as paged through.
#[derive(Debug, Serialize)]
pub struct StoredMessage {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// As PostgreSQL prints it; left out of a page that cannot hold it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<serde_json::value::RawValue>>,
    /// The payload's bytes as printed.
    #[serde(skip)]
    pub size: i64,
    /// Said only for a payload left out for its size: larger than a whole page holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// What a replica is to run after claiming a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub workers: u16,
    pub version: i64,
}

/// How a claimed consumer is doing, as its replica reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub state: &'static str,
    pub workers: Option<u16>,
    pub version: i64,
    pub error: Option<String>,
}
