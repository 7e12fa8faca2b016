//! An AMQP client as a publisher would use one: publish with confirms, inspect and delete queues.

use std::time::Duration;

use amiquip::{
    AmqpProperties, Channel, Confirm, ConfirmSmoother, Connection, Publish, QueueDeleteOptions,
};
use crossbeam_channel::Receiver;
use tenantd::{connect_broker, BrokerAddr};

pub struct Amqp {
    // Field order: the channel closes before its connection.
    channel: Channel,
    confirms: Receiver<Confirm>,
    smoother: ConfirmSmoother,
    published: u64,
    confirmed: u64,
    connection: Connection,
}

impl Amqp {
    pub fn connect() -> Amqp {
        Amqp::connect_to(&super::rabbitmq_url())
    }

    /// A client of the broker (and vhost) at `url`.
    pub fn connect_to(url: &str) -> Amqp {
        let addr = BrokerAddr::parse(url).expect("RABBITMQ_URL");
        let mut connection = connect_broker(&addr, Duration::from_secs(5), "tenantd tests")
            .unwrap_or_else(|e| {
                panic!("RabbitMQ is unreachable at {url}: {e:#} (scripts/test.sh starts it)")
            });
        let channel = connection.open_channel(None).unwrap();
        channel.enable_publisher_confirms().unwrap();
        let confirms = channel.listen_for_publisher_confirms().unwrap();
        Amqp {
            channel,
            confirms,
            smoother: ConfirmSmoother::new(),
            published: 0,
            confirmed: 0,
            connection,
        }
    }

    /// Publishes to `queue` through the default exchange, as any AMQP client would.
    pub fn publish(&mut self, queue: &str, body: &[u8], message_id: Option<&str>) {
        let mut properties = AmqpProperties::default();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.to_string());
        }
        self.publish_with(queue, body, properties);
    }

    /// Publishes with these properties (made persistent).
    pub fn publish_with(&mut self, queue: &str, body: &[u8], properties: AmqpProperties) {
        let properties = properties.with_delivery_mode(2);
        self.channel
            .basic_publish("", Publish::with_properties(body, queue, properties))
            .expect("publishing");
        self.published += 1;
    }

    /// Publishes `{"i": n}` for n in 0..count to `queue` (without message ids), confirmed.
    pub fn publish_numbered(&mut self, queue: &str, count: usize) {
        for i in 0..count {
            let body = serde_json::json!({ "i": i }).to_string();
            self.publish(queue, body.as_bytes(), None);
        }
        self.wait_confirms();
    }

    /// Publishes a plan of (tenant index, message id, poison) — poison is not JSON, the others
    /// `{"i": n}` — waiting for confirms every `confirm_every` messages.
    pub fn publish_plan(
        &mut self,
        tenants: &[String],
        plan: &[(usize, String, bool)],
        confirm_every: usize,
    ) {
        for (i, (t, id, poison)) in plan.iter().enumerate() {
            let body = match poison {
                true => b"poison".to_vec(),
                false => serde_json::json!({ "i": i }).to_string().into_bytes(),
            };
            self.publish(&super::queue_name(&tenants[*t]), &body, Some(id));
            if i % confirm_every == confirm_every - 1 {
                self.wait_confirms();
            }
        }
        self.wait_confirms();
    }

    /// Waits until the broker confirmed every message published so far.
    pub fn wait_confirms(&mut self) {
        while self.confirmed < self.published {
            let confirm = self
                .confirms
                .recv_timeout(Duration::from_secs(30))
                .expect("publisher confirm");
            for c in self.smoother.process(confirm) {
                assert!(matches!(c, Confirm::Ack(_)), "broker nacked a publish");
                self.confirmed += 1;
            }
        }
    }

    /// `(messages ready, consumers)` of a queue, or `None` when it does not exist.
    pub fn queue_stats(&mut self, queue: &str) -> Option<(u32, u32)> {
        // A passive declare of a missing queue closes its channel: use a channel of its own.
        let channel = self.connection.open_channel(None).expect("channel");
        let stats = channel.queue_declare_passive(queue).ok().map(|q| {
            (
                q.declared_message_count().unwrap_or(0),
                q.declared_consumer_count().unwrap_or(0),
            )
        });
        let _ = channel.close();
        stats
    }

    pub fn consumers(&mut self, queue: &str) -> u32 {
        self.queue_stats(queue).map_or(0, |s| s.1)
    }

    /// Takes one message off `queue` (acked), with its body and headers.
    pub fn take(&mut self, queue: &str) -> Option<(Vec<u8>, AmqpProperties)> {
        let get = self.channel.basic_get(queue, false).ok()??;
        let result = (get.delivery.body.clone(), get.delivery.properties.clone());
        get.ack(&self.channel).expect("ack");
        Some(result)
    }

    /// Declares a durable queue (as a create that went no further leaves them).
    pub fn declare(&mut self, queue: &str) {
        let options = amiquip::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue, options)
            .expect("declaring a queue");
    }

    pub fn delete_queue(&mut self, queue: &str) {
        self.channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .expect("deleting a queue");
    }

    pub fn delete_tenant_queues(&mut self, tenant: &str) {
        let queues = [
            super::queue_name(tenant),
            super::retry_name(tenant),
            super::dlq_name(tenant),
        ];
        for queue in queues {
            let _ = self
                .channel
                .queue_delete(queue, QueueDeleteOptions::default());
        }
    }
}
