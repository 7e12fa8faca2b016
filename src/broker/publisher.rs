//! Publishing on a channel in confirm mode, `mandatory`: done only when the broker has taken
//! each message, failing when it refused one or could not route it (its queue is missing: the
//! broker returns it before confirming). One at a time (`publish`), or a window sent at once and
//! then waited for (`send`, then `wait_all`).

use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Confirm, Publish, Return};
use anyhow::{bail, Result};
use crossbeam_channel::Receiver;

use super::{wait_for_confirm, Unconfirmed};

pub struct Publisher {
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    /// Publishes sent on the channel so far (the broker numbers confirms from 1).
    published: u64,
    /// Publishes the broker has confirmed so far.
    confirmed: u64,
    timeout: Duration,
}

impl Publisher {
    /// Puts `channel` in confirm mode (without waiting for the broker's answer: a refusal
    /// closes the channel and fails the next call); use this publisher for every publish on it.
    pub fn enable(channel: &Channel, timeout: Duration) -> Result<Publisher> {
        channel.enable_publisher_confirms_nowait()?;
        Ok(Publisher {
            confirms: channel.listen_for_publisher_confirms()?,
            returns: channel.listen_for_returns()?,
            published: 0,
            confirmed: 0,
            timeout,
        })
    }

    /// Publishes to `queue` through the default exchange and waits for the broker's confirm.
    pub fn publish(
        &mut self,
        channel: &Channel,
        queue: &str,
        body: &[u8],
        properties: AmqpProperties,
    ) -> Result<()> {
        self.send(channel, queue, body, properties)?;
        wait_for_confirm(&self.confirms, self.published, self.timeout)?;
        self.confirmed = self.published;
        self.check_returns(queue)
    }

    /// Publishes to `queue` through the default exchange without waiting: `wait_all` says
    /// whether the broker took it.
    pub fn send(
        &mut self,
        channel: &Channel,
        queue: &str,
        body: &[u8],
        properties: AmqpProperties,
    ) -> Result<()> {
        let publish = Publish {
            mandatory: true,
            ..Publish::with_properties(body, queue, properties)
        };
        channel.basic_publish("", publish)?;
        self.published += 1;
        Ok(())
    }

    /// Waits until the broker confirmed everything sent so far; fails when it refused or
    /// returned any of it (`queue` names the destination in the error).
    pub fn wait_all(&mut self, queue: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + self.timeout;
        while self.confirmed < self.published {
            let confirm = self
                .confirms
                .recv_deadline(deadline)
                .map_err(|_| Unconfirmed)?;
            let payload = match confirm {
                Confirm::Ack(p) => p,
                Confirm::Nack(_) => bail!("the broker refused a message"),
            };
            self.confirmed = self.confirmed.max(payload.delivery_tag);
        }
        self.check_returns(queue)
    }

    /// A return comes before the confirm of the same publish.
    fn check_returns(&self, queue: &str) -> Result<()> {
        match self.returns.try_recv() {
            Ok(_) => Err(Unroutable(queue.to_string()).into()),
            Err(_) => Ok(()),
        }
    }
}

/// The broker could not route a message: the queue it was sent to does not exist.
#[derive(Debug)]
pub struct Unroutable(pub String);

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker could not route the message to {}", self.0)
    }
}

impl std::error::Error for Unroutable {}
