//! Typed tenant ids: the only way to build a queue or partition name, so SQL and AMQP never see a
//! name that was not derived from a parsed UUID.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A tenant's id. Queue names use it hyphenated; table names use it with `_` for `-`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Uuid);

impl TenantId {
    pub fn uuid(self) -> Uuid {
        self.0
    }

    /// `tenant_{id}_queue`: where publishers send the tenant's messages.
    pub fn queue_name(self) -> String {
        format!("tenant_{}_queue", self.0.hyphenated())
    }

    /// `tenant_{id}_dlq`: where messages that can never be stored end up, with the reason.
    pub fn dlq_name(self) -> String {
        format!("tenant_{}_dlq", self.0.hyphenated())
    }

    /// `tenant_{id}_retry`: messages waiting out the delay before their next attempt.
    pub fn retry_name(self) -> String {
        format!("tenant_{}_retry", self.0.hyphenated())
    }

    /// `messages_{id with _}`: the tenant's partition of `messages`.
    pub fn partition_name(self) -> String {
        format!("messages_{}", self.0.hyphenated()).replace('-', "_")
    }

    /// The key of the tenant's advisory lock in PostgreSQL: the id folded to 32 bits. Two
    /// tenants that share a key only wait for each other's operations.
    pub fn lock_key(self) -> i32 {
        let bytes = self.0.as_bytes();
        let word =
            |i: usize| i32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        word(0) ^ word(4) ^ word(8) ^ word(12)
    }

    /// A thread name within Linux's 15-byte limit that still says whose thread it is.
    pub fn thread_name(self) -> String {
        let hex = self.0.simple().to_string();
        format!("tenant-{}", &hex[..8])
    }
}

impl From<Uuid> for TenantId {
    fn from(uuid: Uuid) -> Self {
        TenantId(uuid)
    }
}

impl FromStr for TenantId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TenantId)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_patterns() {
        let id: TenantId = "2a7a0324-8118-4e0a-9699-35c1ca694c2e".parse().unwrap();
        assert_eq!(
            id.queue_name(),
            "tenant_2a7a0324-8118-4e0a-9699-35c1ca694c2e_queue"
        );
        assert_eq!(
            id.partition_name(),
            "messages_2a7a0324_8118_4e0a_9699_35c1ca694c2e"
        );
        assert_eq!(id.thread_name(), "tenant-2a7a0324");
    }
}
