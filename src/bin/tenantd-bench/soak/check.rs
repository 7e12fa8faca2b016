//! The checker: once the faults are over and the backlog consumed, what was published against
//! what was stored (by message id, from the rows' own payloads) and what was dead-lettered,
//! and the spans without a consumer (or with two) charged to the fault they began in.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use postgres::Client;
use uuid::Uuid;

use super::nemesis::{Fault, Kind, KINDS};
use super::servers::Servers;
use super::traffic::{Published, Sent};
use super::watch::Span;
use super::Settings;
use crate::Report;

/// Waits until every tenant's queue and retry queue are empty with one consumer each, and the
/// dead-letter queues stopped growing; how long it took, and whether it got there.
pub fn drain(servers: &Servers, tenants: &[Uuid], settings: &Settings) -> (f64, bool) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let names: HashSet<String> = tenants.iter().map(|t| format!("tenant_{t}_")).collect();
    let mut last_dead = None;
    while Instant::now() < deadline {
        let queues = servers.queues();
        let ours = |q: &str| q.rfind('_').is_some_and(|i| names.contains(&q[..=i]));
        let mut dead = 0;
        let mut busy = queues.len() < tenants.len();
        for (name, messages, consumers) in queues.iter().filter(|q| ours(&q.0)) {
            if name.ends_with("_dlq") {
                dead += messages;
            } else {
                let main = name.ends_with("_queue");
                busy |= *messages > 0 || (main && *consumers != 1);
            }
        }
        if !busy && last_dead == Some(dead) {
            return (started.elapsed().as_secs_f64(), true);
        }
        last_dead = Some(dead);
        settings.sleep(Duration::from_secs(1)); // rabbitmqctl takes most of a second itself
    }
    (started.elapsed().as_secs_f64(), false)
}

/// Stored rows against confirmed messages.
pub fn stored(pg: &mut Client, published: &Published, tenants: &[Uuid], report: &mut Report) {
    let rows = pg
        .query("SELECT tenant_id, payload->>'id' FROM messages", &[])
        .expect("reading the stored messages");
    let mut times: HashMap<Uuid, u64> = HashMap::new();
    let mut misplaced = 0;
    let all: HashMap<Uuid, usize> = published
        .confirmed
        .iter()
        .chain(&published.unconfirmed)
        .map(|s| (s.id, s.tenant))
        .collect();
    for row in &rows {
        let tenant: Uuid = row.get(0);
        let id = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
        let Some(id) = id else {
            misplaced += 1; // a row that is none of ours
            continue;
        };
        *times.entry(id).or_default() += 1;
        if all.get(&id).map(|&t| tenants[t]) != Some(tenant) {
            misplaced += 1;
        }
    }
    let good = published.confirmed.iter().filter(|s| !s.poison);
    let lost = good.filter(|s| !times.contains_key(&s.id)).count();
    let twice: u64 = times.values().map(|n| n - 1).sum();
    let unconfirmed_stored = published
        .unconfirmed
        .iter()
        .filter(|s| times.contains_key(&s.id))
        .count();
    let poison = published.confirmed.iter().filter(|s| s.poison).count();
    report.add("published", published.confirmed.len() as f64, "confirmed");
    report.add("poison", poison as f64, "of them not JSON");
    report.add(
        "unconfirmed",
        published.unconfirmed.len() as f64,
        "no confirm (broker down)",
    );
    report.add(
        "unconfirmed_stored",
        unconfirmed_stored as f64,
        "of them stored",
    );
    report.add("stored", rows.len() as f64, "rows");
    report.add("lost", lost as f64, "confirmed, not stored");
    report.add("stored_twice", twice as f64, "extra rows of one id");
    report.add(
        "stored_misplaced",
        misplaced as f64,
        "rows in a wrong partition or unknown",
    );
}

/// Dead letters against poison messages: every letter taken off the tenants' DLQs. A message
/// lettered twice, its first letter made just before a replica was killed or stopped or its
/// broker path failed and its second after that, is the window the design admits (a letter
/// confirmed, or its confirm lost, before its record committed: the redelivered original is
/// lettered again); it is counted apart, every other second letter is a fault.
pub fn dead_letters(
    url: &str,
    tenants: &[Uuid],
    published: &Published,
    faults: &[Fault],
    report: &mut Report,
) {
    let addr = tenantd::BrokerAddr::parse(url).expect("the soak's broker URL");
    let mut connection = tenantd::connect_broker(&addr, Duration::from_secs(5), "soak checker")
        .expect("connecting to the soak's broker");
    let channel = connection.open_channel(None).expect("a channel");
    let mut letters: Vec<Option<Uuid>> = Vec::new();
    let mut stamps: HashMap<Option<Uuid>, Vec<Instant>> = HashMap::new();
    for t in tenants {
        while let Some(get) = channel
            .basic_get(format!("tenant_{t}_dlq"), true)
            .expect("reading a DLQ")
        {
            let properties = &get.delivery.properties;
            let id = properties.message_id().as_ref();
            let id = id.and_then(|id| id.parse().ok());
            if let Some(at) = lettered_at(properties) {
                stamps.entry(id).or_default().push(at);
            }
            letters.push(id);
        }
    }
    let _ = connection.close();
    let poison = |sent: &[Sent]| -> HashSet<Uuid> {
        sent.iter().filter(|s| s.poison).map(|s| s.id).collect()
    };
    let confirmed = poison(&published.confirmed);
    let any_poison: HashSet<Uuid> = &confirmed | &poison(&published.unconfirmed);
    let distinct: HashSet<Option<Uuid>> = letters.iter().copied().collect();
    let missing = confirmed
        .iter()
        .filter(|id| !distinct.contains(&Some(**id)))
        .count();
    let not_poison = letters
        .iter()
        .filter(|id| !id.is_some_and(|id| any_poison.contains(&id)))
        .count();
    let blows: Vec<Instant> = faults
        .iter()
        .filter(|f| !matches!(f.kind, Kind::DbCut | Kind::DbRestart))
        .map(|f| f.struck)
        .collect();
    let mut per_id: HashMap<Option<Uuid>, usize> = HashMap::new();
    for id in &letters {
        *per_id.entry(*id).or_default() += 1;
    }
    let (mut twice, mut at_a_blow) = (0, 0);
    for (id, n) in per_id.into_iter().filter(|(_, n)| *n > 1) {
        let excused = n == 2 && stamps.get(&id).is_some_and(|s| across_a_blow(s, &blows));
        match excused {
            true => at_a_blow += 1,
            false => twice += n - 1,
        }
    }
    report.add("dead_letters", letters.len() as f64, "in the DLQs");
    report.add(
        "dead_letters_twice",
        twice as f64,
        "extra letters of one message",
    );
    report.add(
        "dead_letters_twice_at_a_blow",
        at_a_blow as f64,
        "of a message lettered just before a kill, a stop or a broker fault, and after it",
    );
    report.add("poison_not_dead_lettered", missing as f64, "");
    report.add("dead_letters_not_poison", not_poison as f64, "");
}

/// The longest a letter's confirm and its record's commit can follow its stamp under the soak's
/// load: a blow within this after a letter may have fallen between them.
const LETTER_TO_RECORD: Duration = Duration::from_secs(2);

/// Whether two letters of one message fall on either side of a blow, the first at most
/// `LETTER_TO_RECORD` before it.
fn across_a_blow(stamps: &[Instant], blows: &[Instant]) -> bool {
    let [a, b] = stamps else {
        return false;
    };
    let (first, second) = (a.min(b), a.max(b));
    blows.iter().any(|&blow| {
        *first <= blow && blow.duration_since(*first) <= LETTER_TO_RECORD && *second > blow
    })
}

/// When a letter was made (its `x-tenantd-dead-lettered-at`, Unix ms), on this process's clock.
fn lettered_at(properties: &amiquip::AmqpProperties) -> Option<Instant> {
    let headers = properties.headers().as_ref()?;
    let ms = match headers.get("x-tenantd-dead-lettered-at")? {
        amiquip::AmqpValue::LongLongInt(ms) => *ms,
        _ => return None,
    };
    let stamped = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?);
    let ago = std::time::SystemTime::now().duration_since(stamped).ok()?;
    Instant::now().checked_sub(ago)
}

/// The longest span in each fault, by kind; and the longest outside any fault.
pub fn spans(faults: &[Fault], gaps: &[Span], doubles: &[Span], report: &mut Report) -> Vec<Row> {
    let gap_by_fault = charge(faults, gaps, true);
    let double_by_fault = charge(faults, doubles, false);
    let rows: Vec<Row> = faults
        .iter()
        .enumerate()
        .map(|(n, f)| Row {
            kind: f.kind,
            replica: f.replica.unwrap_or("-"),
            tenants: f.replica_tenants.map_or("-".into(), |n| n.to_string()),
            held: f.healed.duration_since(f.start).as_secs_f64(),
            no_consumer: gap_by_fault.per_fault[n],
            two_consumers: double_by_fault.per_fault[n],
        })
        .collect();
    for kind in KINDS {
        let of_kind = rows.iter().filter(|r| r.kind == kind);
        let gap = of_kind.clone().map(|r| r.no_consumer).fold(0.0, f64::max);
        let double = of_kind.map(|r| r.two_consumers).fold(0.0, f64::max);
        let (gap_key, double_key) = kind.keys();
        report.add(gap_key, round2(gap), "s");
        report.add(double_key, round2(double), "s");
    }
    report.add(
        "no_consumer_max_s_calm",
        round2(gap_by_fault.calm),
        "s, outside faults",
    );
    report.add(
        "two_consumers_max_s_calm",
        round2(double_by_fault.calm),
        "s, outside faults",
    );
    rows
}

/// One fault's line in the table.
pub struct Row {
    pub kind: Kind,
    pub replica: &'static str,
    /// Tenants the replica ran when the fault began.
    pub tenants: String,
    pub held: f64,
    pub no_consumer: f64,
    pub two_consumers: f64,
}

struct Charged {
    per_fault: Vec<f64>,
    calm: f64,
}

/// Charges each span to the fault it began in (from the fault's start to the next one's),
/// counting a whole-server fault's spans from the server's return when `from_return`.
fn charge(faults: &[Fault], spans: &[Span], from_return: bool) -> Charged {
    let mut charged = Charged {
        per_fault: vec![0.0; faults.len()],
        calm: 0.0,
    };
    for span in spans {
        let owner = faults
            .iter()
            .position(|f| f.start <= span.start && span.start < f.end);
        let (slot, from) = match owner {
            Some(n) => {
                let f = &faults[n];
                let clip = from_return && f.kind.whole_server();
                let from = if clip {
                    span.start.max(f.healed)
                } else {
                    span.start
                };
                (&mut charged.per_fault[n], from)
            }
            None => (&mut charged.calm, span.start),
        };
        *slot = f64::max(
            *slot,
            span.end.saturating_duration_since(from).as_secs_f64(),
        );
    }
    charged
}

pub fn print_faults(rows: &[Row], settings: &Settings) {
    let goal = settings.goal().as_secs_f64();
    println!(
        "{:>3}  {:<15} {:<7} {:>7} {:>7} {:>17} {:>19}  verdict (goal ≤ {goal} s)",
        "#", "fault", "replica", "tenants", "held s", "no consumer max s", "two consumers max s"
    );
    for (n, r) in rows.iter().enumerate() {
        let verdict = if r.no_consumer <= goal { "ok" } else { "FAIL" };
        println!(
            "{:>3}  {:<15} {:<7} {:>7} {:>7.1} {:>17.2} {:>19.2}  {verdict}",
            n + 1,
            r.kind.name(),
            r.replica,
            r.tenants,
            r.held,
            r.no_consumer,
            r.two_consumers
        );
    }
    println!(
        "(a fault on a replica is healed once a tenant has gone {:.1} s without a consumer: a \
         FAIL's figure is then how long until after the heal, not how long the fault would last)",
        goal + 0.5
    );
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::across_a_blow;

    #[test]
    fn only_two_letters_on_either_side_of_a_blow_just_after_the_first_are_excused() {
        let blow = Instant::now() + Duration::from_secs(60);
        let at = |ms: i64| match ms < 0 {
            true => blow - Duration::from_millis(ms.unsigned_abs()),
            false => blow + Duration::from_millis(ms as u64),
        };
        assert!(across_a_blow(&[at(-500), at(8000)], &[blow]));
        assert!(
            across_a_blow(&[at(8000), at(-500)], &[blow]),
            "in any order"
        );
        assert!(
            !across_a_blow(&[at(-3000), at(8000)], &[blow]),
            "long before it"
        );
        assert!(
            !across_a_blow(&[at(-500), at(-100)], &[blow]),
            "both before it"
        );
        assert!(
            !across_a_blow(&[at(100), at(8000)], &[blow]),
            "both after it"
        );
        assert!(!across_a_blow(&[at(-500), at(8000)], &[]), "no blow");
        assert!(
            !across_a_blow(&[at(-500), at(1), at(8000)], &[blow]),
            "three letters"
        );
    }
}
