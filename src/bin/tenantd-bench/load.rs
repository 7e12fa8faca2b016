//! Load on the broker: preloading queues, draining them with no work (the broker's own ceiling),
//! and publishing at a fixed rate.

use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use tenantd::{connect_broker, BrokerAddr};
use uuid::Uuid;

pub fn connect(url: &str) -> amiquip::Connection {
    let addr = BrokerAddr::parse(url).expect("RABBITMQ_URL");
    connect_broker(&addr, Duration::from_secs(10), "tenantd-bench").expect("connecting to RabbitMQ")
}

/// Extra bytes of padding in every body (`--payload-bytes` minus the ~240 of the base body).
static PADDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Makes every body about `bytes` long (never below the ~240-byte base).
pub fn set_payload_bytes(bytes: usize) {
    let base = body(0).len();
    PADDING.store(
        bytes.saturating_sub(base),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// A ~240-byte JSON order event, padded to the chosen size.
pub fn body(seq: u64) -> Vec<u8> {
    body_sent(seq, 0)
}

/// The same, carrying when it was published (Unix time in µs) for latency measurements.
pub fn body_sent(seq: u64, sent_us: i64) -> Vec<u8> {
    let pad = "x".repeat(PADDING.load(std::sync::atomic::Ordering::Relaxed));
    format!(
        r#"{{"seq":{seq},"sent_us":{sent_us},"event":"order.created","customer":"c-{:06}","items":[{{"sku":"A-100","qty":2}},{{"sku":"B-220","qty":1}}],"total":{}.{:02},"currency":"EUR","note":"benchmark payload of roughly two hundred and forty bytes{pad}"}}"#,
        seq % 1_000_000,
        seq % 997,
        seq % 100
    )
    .into_bytes()
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Publishes `per_queue` messages with UUID message ids to each queue, from at most
/// `PRELOADERS` threads (one connection each; a thousand connects at once time out), and returns
/// once the broker confirmed them all.
pub fn preload(url: &str, queues: &[String], per_queue: u64) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..queues.len().min(PRELOADERS) {
            let next = &next;
            s.spawn(move || {
                let mut connection = connect(url);
                let channel = connection.open_channel(None).unwrap();
                channel.enable_publisher_confirms().unwrap();
                let confirms = channel.listen_for_publisher_confirms().unwrap();
                let mut smoother = ConfirmSmoother::new();
                let (mut published, mut confirmed) = (0u64, 0u64);
                while let Some(queue) =
                    queues.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    for seq in 0..per_queue {
                        let props = AmqpProperties::default()
                            .with_message_id(Uuid::now_v7().to_string())
                            .with_delivery_mode(2);
                        channel
                            .basic_publish(
                                "",
                                Publish::with_properties(&body(seq), queue.as_str(), props),
                            )
                            .unwrap();
                        published += 1;
                        // Keep at most 1,000 unconfirmed, as a careful publisher would.
                        while published - confirmed > 1000 {
                            confirmed += smoother.process(confirms.recv().unwrap()).count() as u64;
                        }
                    }
                }
                while confirmed < published {
                    confirmed += smoother.process(confirms.recv().unwrap()).count() as u64;
                }
                let _ = connection.close();
            });
        }
    });
}

/// The most publishing threads a preload runs.
const PRELOADERS: usize = 32;

/// How a plain consumer acks what it drains.
#[derive(Clone, Copy)]
pub enum Acks {
    /// One multiple-ack whenever nothing more is waiting.
    PerBurst,
    /// One multiple-ack per this many messages, as tenantd acks a full batch.
    Every(u64),
}

/// What a plain drain measured: its rate, and the CPU of its consumers (this process, in the
/// split's `tenantd` place), of RabbitMQ and of PostgreSQL over its wall time.
pub struct BrokerDrain {
    pub msgs_per_s: f64,
    pub cpu: crate::procstat::CpuSplit,
    pub wall: std::time::Duration,
}

/// Drains the queues with consume + ack and no work, at tenantd's prefetch (per consumer, as
/// tenantd sets it).
pub fn drain_rate(
    url: &str,
    queues: &[String],
    per_queue: u64,
    prefetch: u16,
    acks: Acks,
) -> BrokerDrain {
    drain(url, queues, per_queue, prefetch, acks, false)
}

/// The same, a connection per queue, with every consume held until all are open (as tenantd's
/// start gate holds them) and the time counted from the first connect: the floor of a start
/// under backlog for any consumer that opens a connection per tenant, acking per burst.
pub fn gated_drain_rate(
    url: &str,
    queues: &[String],
    per_queue: u64,
    prefetch: u16,
) -> BrokerDrain {
    drain(url, queues, per_queue, prefetch, Acks::PerBurst, true)
}

fn drain(
    url: &str,
    queues: &[String],
    per_queue: u64,
    prefetch: u16,
    acks: Acks,
    gated: bool,
) -> BrokerDrain {
    let started = Instant::now();
    let me = [std::process::id()];
    let cpu_before = crate::procstat::CpuSplit::now(&me);
    let gate = std::sync::Barrier::new(if gated { queues.len() } else { 1 });
    std::thread::scope(|s| {
        for queue in queues {
            let gate = &gate;
            s.spawn(move || drain_one(url, queue, per_queue, prefetch, acks, gate));
        }
    });
    let wall = started.elapsed();
    BrokerDrain {
        msgs_per_s: (per_queue * queues.len() as u64) as f64 / wall.as_secs_f64(),
        cpu: crate::procstat::CpuSplit::now(&me).since(cpu_before),
        wall,
    }
}

fn drain_one(
    url: &str,
    queue: &str,
    count: u64,
    prefetch: u16,
    acks: Acks,
    gate: &std::sync::Barrier,
) {
    let mut connection = connect(url);
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, prefetch, false).unwrap();
    gate.wait();
    let consumer = channel
        .basic_consume(queue, ConsumerOptions::default())
        .unwrap();
    let next = || match consumer.receiver().recv().unwrap() {
        ConsumerMessage::Delivery(d) => d,
        other => panic!("consumer ended: {other:?}"),
    };
    let mut taken = 0;
    while taken < count {
        let mut last = next();
        taken += 1;
        match acks {
            Acks::PerBurst => {
                while let Ok(ConsumerMessage::Delivery(d)) = consumer.receiver().try_recv() {
                    last = d;
                    taken += 1;
                }
            }
            Acks::Every(n) => {
                while taken % n != 0 && taken < count {
                    last = next();
                    taken += 1;
                }
            }
        }
        consumer.ack_multiple(last).unwrap();
    }
    drop(consumer);
    let _ = channel.close();
    let _ = connection.close();
}

/// Publishes `{"seq": n, "sent_us": …, ...}` to `queue` at `rate` per second for `seconds`;
/// returns how many it published.
pub fn publish_at_rate(url: &str, queue: &str, rate: u64, seconds: u64) -> u64 {
    publish_at_rate_to(url, &[queue], rate, seconds)
}

/// The same, each message published to every one of `queues` (the same body, at once).
pub fn publish_at_rate_to(url: &str, queues: &[&str], rate: u64, seconds: u64) -> u64 {
    let mut connection = connect(url);
    let channel = connection.open_channel(None).unwrap();
    let total = rate * seconds;
    let start = Instant::now();
    for seq in 0..total {
        let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let props = AmqpProperties::default().with_message_id(Uuid::now_v7().to_string());
        let body = body_sent(seq, now_us());
        for queue in queues {
            let publish = Publish::with_properties(&body, *queue, props.clone());
            channel.basic_publish("", publish).unwrap();
        }
    }
    let _ = channel.close();
    let _ = connection.close();
    total
}

/// A plain consumer on `queue` (no work, auto-ack) that, once it consumes, says so on `ready`,
/// and returns each message's publish time (Unix µs) and publish → received (ms) once `count`
/// arrived.
pub fn receive_latencies(
    url: &str,
    queue: &str,
    count: u64,
    ready: std::sync::mpsc::Sender<()>,
) -> Vec<(i64, f64)> {
    let mut connection = connect(url);
    let channel = connection.open_channel(None).unwrap();
    let options = ConsumerOptions {
        no_ack: true,
        ..ConsumerOptions::default()
    };
    let consumer = channel.basic_consume(queue, options).unwrap();
    let _ = ready.send(());
    let mut latencies = Vec::with_capacity(count as usize);
    while (latencies.len() as u64) < count {
        let delivery = match consumer.receiver().recv().unwrap() {
            ConsumerMessage::Delivery(d) => d,
            other => panic!("the probe's consumer ended: {other:?}"),
        };
        let received = now_us();
        let body: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
        let sent = body["sent_us"].as_i64().expect("a published time");
        latencies.push((sent, (received - sent) as f64 / 1e3));
    }
    drop(consumer);
    let _ = channel.close();
    let _ = connection.close();
    latencies
}

/// Publishes to every queue `per_queue_rate` messages a second (with ids and publish times)
/// until `stop`; returns how many it published, all confirmed.
pub fn publish_flow(
    url: &str,
    queues: &[String],
    per_queue_rate: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    let mut connection = connect(url);
    let channel = connection.open_channel(None).unwrap();
    channel.enable_publisher_confirms().unwrap();
    let confirms = channel.listen_for_publisher_confirms().unwrap();
    let mut smoother = ConfirmSmoother::new();
    let start = Instant::now();
    let mut sent = 0;
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for queue in queues {
            let props = AmqpProperties::default()
                .with_message_id(Uuid::now_v7().to_string())
                .with_delivery_mode(2);
            let body = body_sent(round, now_us());
            channel
                .basic_publish("", Publish::with_properties(&body, queue.as_str(), props))
                .unwrap();
            sent += 1;
        }
        round += 1;
        let due = start + Duration::from_secs_f64(round as f64 / per_queue_rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let mut confirmed = 0;
    while confirmed < sent {
        confirmed += smoother.process(confirms.recv().unwrap()).count() as u64;
    }
    let _ = connection.close();
    sent
}
