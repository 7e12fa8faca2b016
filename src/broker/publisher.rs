//! Publishing one message at a time on a channel in confirm mode, `mandatory`: done only when
//! the broker has taken it, failing when it refused it or could not route it (its queue is
//! missing: the broker returns it before confirming).

use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Confirm, Publish, Return};
use anyhow::Result;
use crossbeam_channel::Receiver;

use super::{wait_for_confirm, Unroutable};

pub struct Publisher {
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    published: u64,
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
        let publish = Publish {
            mandatory: true,
            ..Publish::with_properties(body, queue, properties)
        };
        channel.basic_publish("", publish)?;
        self.published += 1;
        wait_for_confirm(&self.confirms, self.published, self.timeout)?;
        // A return comes before the confirm of the same publish.
        match self.returns.try_recv() {
            Ok(_) => Err(Unroutable(queue.to_string()).into()),
            Err(_) => Ok(()),
        }
    }
}
