//! The soak's load: a publisher of messages with ids (1 in 100 not JSON) to the tenants'
//! queues, and of bursts on demand, keeping the ids the broker confirmed, straight through any
//! broker restart; and a caller of lifecycle operations (pause, resume, resize, create and
//! delete) through random replicas, counting how each was answered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Connection, Publish};
use crossbeam_channel::Receiver;
use serde_json::json;
use uuid::Uuid;

use super::fleet::{Fleet, CALL_TIMEOUT};
use crate::stack::http;

/// One message in this many, on average, is not JSON.
pub const POISON_ONE_IN: u64 = 100;

/// Extra messages asked of the publisher at once (a backlog for the replicas to ingest).
#[derive(Default)]
pub struct Burst(AtomicU64);

impl Burst {
    pub fn ask(&self, messages: u64) {
        self.0.store(messages, Ordering::SeqCst);
    }

    /// Whether the publisher has yet to send the burst asked.
    pub fn pending(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// One message as published.
#[derive(Clone, Copy)]
pub struct Sent {
    pub id: Uuid,
    pub tenant: usize,
    pub poison: bool,
}

#[derive(Default)]
pub struct Published {
    /// The broker confirmed them: each must end stored (or, when poison, dead-lettered).
    pub confirmed: Vec<Sent>,
    /// Published when the connection failed before the confirm: each may or may not be in.
    pub unconfirmed: Vec<Sent>,
    /// The broker refused them.
    pub nacked: u64,
}

/// A publisher session: its channel in confirm mode and what awaits a confirm, by tag.
struct Session {
    // Field order: the channel closes before its connection.
    channel: Channel,
    confirms: Receiver<Confirm>,
    smoother: ConfirmSmoother,
    pending: VecDeque<(u64, Sent)>,
    next_tag: u64,
    connection: Connection,
}

/// Publishes `rate` messages a second to each queue (and each burst asked, spread over them)
/// until `stop`, reconnecting whenever the broker goes away; then waits (briefly) for the last
/// confirms.
pub fn publish(
    url: &str,
    queues: &[String],
    rate: u64,
    burst: &Burst,
    stop: &AtomicBool,
) -> Published {
    let mut published = Published::default();
    let mut session: Option<Session> = None;
    let mut rng = fastrand::Rng::with_seed(7);
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut due = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let Some(s) = session.as_mut() else {
            session = Session::open(url);
            if session.is_none() {
                std::thread::sleep(Duration::from_millis(200)); // the broker is restarting
            }
            continue;
        };
        let extra = burst.0.load(Ordering::SeqCst);
        let round = (0..queues.len() as u64 + extra).try_for_each(|k| {
            let tenant = (k % queues.len() as u64) as usize;
            let sent = Sent {
                id: Uuid::new_v4(),
                tenant,
                poison: rng.u64(..POISON_ONE_IN) == 0,
            };
            s.publish(&queues[tenant], sent)
        });
        if round.is_err() || s.settle(&mut published, false).is_err() {
            end(session.take(), &mut published);
            continue;
        }
        burst.0.fetch_sub(extra, Ordering::SeqCst);
        due = (due + period).max(Instant::now() - period); // no catching up after an outage
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    if let Some(s) = session.as_mut() {
        let _ = s.settle(&mut published, true);
    }
    end(session, &mut published);
    published
}

/// The session is gone: whatever awaited a confirm is unconfirmed.
fn end(session: Option<Session>, published: &mut Published) {
    if let Some(s) = session {
        let pending = s.pending.into_iter().map(|(_, sent)| sent);
        published.unconfirmed.extend(pending);
        let _ = s.connection.close();
    }
}

impl Session {
    fn open(url: &str) -> Option<Session> {
        let addr = tenantd::BrokerAddr::parse(url).ok()?;
        let timeout = Duration::from_secs(2);
        let mut connection = tenantd::connect_broker(&addr, timeout, "soak publisher").ok()?;
        let channel = connection.open_channel(None).ok()?;
        channel.enable_publisher_confirms().ok()?;
        let confirms = channel.listen_for_publisher_confirms().ok()?;
        Some(Session {
            channel,
            confirms,
            smoother: ConfirmSmoother::new(),
            pending: VecDeque::new(),
            next_tag: 1,
            connection,
        })
    }

    fn publish(&mut self, queue: &str, sent: Sent) -> amiquip::Result<()> {
        let body = match sent.poison {
            true => format!("not json {}", sent.id).into_bytes(),
            false => json!({"id": sent.id, "tenant": sent.tenant, "note": "soak"})
                .to_string()
                .into_bytes(),
        };
        let properties = AmqpProperties::default()
            .with_message_id(sent.id.to_string())
            .with_delivery_mode(2);
        let publish = Publish::with_properties(&body, queue, properties);
        self.channel.basic_publish("", publish)?;
        self.pending.push_back((self.next_tag, sent));
        self.next_tag += 1;
        Ok(())
    }

    /// Takes the confirms that arrived (with `all`, waits up to 10 s for every one).
    fn settle(&mut self, published: &mut Published, all: bool) -> Result<(), ()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pending.is_empty() {
            let confirm = match all {
                true => self.confirms.recv_deadline(deadline).map_err(|_| ())?,
                false => match self.confirms.try_recv() {
                    Ok(c) => c,
                    Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                    Err(_) => return Err(()),
                },
            };
            for c in self.smoother.process(confirm) {
                let (tag, acked) = match c {
                    Confirm::Ack(p) => (p.delivery_tag, true),
                    Confirm::Nack(p) => (p.delivery_tag, false),
                };
                while let Some(&(t, sent)) = self.pending.front() {
                    if t > tag {
                        break;
                    }
                    self.pending.pop_front();
                    match acked && t == tag {
                        true => published.confirmed.push(sent),
                        false => published.nacked += 1,
                    }
                }
            }
        }
        Ok(())
    }
}

/// How the lifecycle calls were answered.
#[derive(Default)]
pub struct Calls {
    pub made: u64,
    /// 2xx other than 202.
    pub applied: u64,
    /// 202: saved, not applied within the wait.
    pub accepted: u64,
    /// 4xx or 5xx.
    pub refused: u64,
    /// How many of each refusal.
    pub refusals: std::collections::BTreeMap<u16, u64>,
    /// No answer within the timeout, or the connection failed.
    pub unanswered: u64,
}

/// The tenants the lifecycle caller changes: the soak's own (paused for a while, resized),
/// and extra ones it creates and deletes.
pub struct Lifecycle<'a> {
    fleet: &'a Fleet,
    tenants: &'a [Uuid],
    rng: fastrand::Rng,
    /// Paused (or maybe paused: the call went unanswered), oldest first.
    pub paused: VecDeque<Uuid>,
    /// Extra tenants that exist (or may: a delete went unanswered).
    pub extras: VecDeque<String>,
    pub calls: Calls,
}

impl<'a> Lifecycle<'a> {
    pub fn new(fleet: &'a Fleet, tenants: &'a [Uuid], seed: u64) -> Lifecycle<'a> {
        Lifecycle {
            fleet,
            tenants,
            rng: fastrand::Rng::with_seed(seed),
            paused: VecDeque::new(),
            extras: VecDeque::new(),
            calls: Calls::default(),
        }
    }

    /// One call about every second until `stop`: at most 3 tenants paused at a time, each
    /// for a few seconds, at most 3 extra tenants.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut created = 0;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(500 + self.rng.u64(..1000)));
            match self.rng.u32(..10) {
                0..=2 if self.paused.len() >= 3 || (!self.paused.is_empty() && self.rng.bool()) => {
                    self.resume_oldest()
                }
                0..=2 => {
                    let t = self.tenants[self.rng.usize(..self.tenants.len())];
                    if !self.paused.contains(&t) {
                        // Unanswered or refused, it may still have been saved: resumed later
                        // either way.
                        self.status(t, "inactive");
                        self.paused.push_back(t);
                    }
                }
                3..=6 => {
                    let t = self.tenants[self.rng.usize(..self.tenants.len())];
                    let body = json!({ "workers": self.rng.u16(1..=4) });
                    let path = format!("/api/tenants/{t}/config/concurrency");
                    self.call("PUT", &path, Some(body));
                }
                7 | 8 if self.extras.len() < 3 => {
                    created += 1;
                    let body = json!({ "name": format!("extra-{created}") });
                    if let Some(reply) = self.call("POST", "/api/tenants", Some(body)) {
                        if let Some(id) = reply.json()["id"].as_str() {
                            self.extras.push_back(id.to_string());
                        }
                    }
                }
                _ => self.delete_oldest_extra(),
            }
        }
    }

    pub fn resume_oldest(&mut self) {
        if let Some(t) = self.paused.pop_front() {
            if self.status(t, "active").is_none() {
                self.paused.push_back(t); // try again later
            }
        }
    }

    pub fn delete_oldest_extra(&mut self) {
        if let Some(id) = self.extras.pop_front() {
            let reply = self.call("DELETE", &format!("/api/tenants/{id}"), None);
            if reply.is_none_or(|r| r.status != 204) {
                self.extras.push_back(id);
            }
        }
    }

    /// Sets a tenant's status; its answer's status when it was saved (200 or 202).
    fn status(&mut self, tenant: Uuid, status: &str) -> Option<u16> {
        let path = format!("/api/tenants/{tenant}");
        let reply = self.call("PATCH", &path, Some(json!({ "status": status })));
        reply.map(|r| r.status)
    }

    /// Calls a random replica that can answer; the reply when it was a success (2xx).
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<http::Reply> {
        self.calls.made += 1;
        let Some(base) = self.fleet.any_base(&mut self.rng) else {
            self.calls.unanswered += 1;
            return None;
        };
        let body = body.map(|b| b.to_string());
        let bytes = body.as_deref().map(str::as_bytes);
        match http::try_request(&base, method, path, bytes, CALL_TIMEOUT) {
            Ok(reply) if reply.status == 202 => {
                self.calls.accepted += 1;
                Some(reply)
            }
            Ok(reply) if reply.status < 300 => {
                self.calls.applied += 1;
                Some(reply)
            }
            Ok(reply) => {
                self.calls.refused += 1;
                *self.calls.refusals.entry(reply.status).or_default() += 1;
                None
            }
            Err(_) => {
                self.calls.unanswered += 1;
                None
            }
        }
    }
}
