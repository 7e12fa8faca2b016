//! The nouns the API and the store share: a tenant and its status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::TenantId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "inactive" => Some(Status::Inactive),
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
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Tenant {
    pub fn tenant_id(&self) -> TenantId {
        TenantId::from(self.id)
    }
}

/// A message as stored and as paged through.
#[derive(Debug, Serialize)]
pub struct StoredMessage {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub payload: Box<serde_json::value::RawValue>,
    pub created_at: DateTime<Utc>,
}
