//! The fault soak, short: every kind of fault once against three replicas of the real binary on
//! private PostgreSQL and RabbitMQ servers (`tenantd-bench --phases soak`, which needs their
//! server programs: scripts/test.sh installs them), and its goals held.

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn a_fault_soak_loses_nothing_and_strands_no_tenant() {
    let out = Command::new(env!("CARGO_BIN_EXE_tenantd-bench"))
        .args([
            "--phases",
            "soak",
            "--soak-seconds",
            "0",
            "--soak-rate",
            "5",
        ])
        .env("FAILOVER_TIMEOUT", "6")
        .env("BROKER_HEARTBEAT_SECS", "2")
        .output()
        .expect("running tenantd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the soak did not finish: {}",
        out.status
    );
    let figures: BTreeMap<&str, f64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("summary "))
        .expect("a summary line")
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.parse().ok()?))
        })
        .collect();
    let figure = |key: &str| figures.get(key).copied().unwrap_or(f64::NAN);
    let goal = figure("goal_s");
    let mut goals: Vec<(String, bool)> = [
        ("every kind of fault injected", figure("faults") == 6.0),
        ("messages published", figure("published") >= 1000.0),
        ("lifecycle calls applied", figure("lifecycle_applied") > 0.0),
        (
            "the backlog consumed at the end, one consumer a tenant",
            figure("drained") == 1.0,
        ),
        ("nothing lost", figure("lost") == 0.0),
        ("nothing stored twice", figure("stored_twice") == 0.0),
        (
            "nothing stored in a wrong partition",
            figure("stored_misplaced") == 0.0,
        ),
        ("no dead letter twice", figure("dead_letters_twice") == 0.0),
        (
            "every poison dead-lettered",
            figure("poison_not_dead_lettered") == 0.0,
        ),
        (
            "only poison dead-lettered",
            figure("dead_letters_not_poison") == 0.0,
        ),
    ]
    .map(|(what, met)| (what.to_string(), met))
    .to_vec();
    let consumed_again = figures
        .iter()
        .filter(|(key, _)| key.starts_with("no_consumer_max_s_"))
        .map(|(key, &s)| (format!("{key} <= {goal} s"), s <= goal));
    goals.extend(consumed_again);
    assert_eq!(goals.len(), 17, "a goal per fault kind: {figures:?}");
    let missed: Vec<String> = goals
        .iter()
        .filter(|(_, met)| !met)
        .map(|(goal, _)| goal.clone())
        .collect();
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{figures:#?}");
}
