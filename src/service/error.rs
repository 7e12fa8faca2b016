//! What can go wrong in an operation, in the service's own words; the HTTP edge alone turns
//! these into status codes.

use crate::store;

#[derive(Debug)]
pub enum ServiceError {
    /// The request asks for something that cannot be (bad cursor, concurrency out of bounds).
    Invalid(String),
    NotFound(String),
    /// The tenant is in a state that forbids this (it is being deleted).
    Conflict(String),
    /// Another operation on the tenant held it too long, or its consumer did not stop in
    /// time; nothing is lost, and trying again finishes the work.
    Busy(String),
    /// PostgreSQL or RabbitMQ cannot do it right now; the request changed nothing.
    Unavailable(String),
    /// A bug: logged with its whole cause.
    Internal(anyhow::Error),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    /// A database failure: the server being unreachable is `Unavailable`, anything else a bug.
    pub fn database(e: anyhow::Error) -> ServiceError {
        if store::Failure::of(&e) == store::Failure::Unreachable {
            ServiceError::Unavailable(format!("database unavailable: {e:#}"))
        } else {
            ServiceError::Internal(e)
        }
    }

    pub fn broker(e: anyhow::Error) -> ServiceError {
        ServiceError::Unavailable(format!("message broker unavailable: {e:#}"))
    }

    pub fn tenant_not_found(id: impl std::fmt::Display) -> ServiceError {
        ServiceError::NotFound(format!("tenant {id} not found"))
    }
}
