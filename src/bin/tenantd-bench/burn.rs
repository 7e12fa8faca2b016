//! CPU load of a given size, in processes of their own: it stands in for what storing costs
//! (tenantd and PostgreSQL) beside a flood that does not store, so that the broker shares the
//! machine as it does beside tenantd's own flood.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The flag that makes the bench a burner: `tenantd-bench --burn 0.4` spins 40 % of a core.
pub const FLAG: &str = "--burn";

const PERIOD: Duration = Duration::from_millis(10);

/// Spins `duty` of each `PERIOD` and sleeps the rest, until killed.
pub fn run(duty: f64) -> ! {
    let busy = PERIOD.mul_f64(duty.clamp(0.0, 1.0));
    loop {
        let start = Instant::now();
        while start.elapsed() < busy {
            std::hint::spin_loop();
        }
        std::thread::sleep(PERIOD.saturating_sub(start.elapsed()));
    }
}

/// Burners spending `cores` of CPU together, each in a session of its own (with the kernel's
/// autogroups, a session is what the scheduler shares the CPU between, as it shares it between
/// the broker, PostgreSQL and tenantd). Killed when dropped.
pub struct Burn(Vec<Child>);

impl Burn {
    pub fn start(cores: f64) -> Burn {
        let count = (cores / 0.9).ceil().max(0.0) as usize;
        let duty = cores / count.max(1) as f64;
        let exe = std::env::current_exe().expect("the bench's own path");
        let children = (0..count)
            .map(|_| {
                Command::new("setsid")
                    .arg(&exe)
                    .args([FLAG, &format!("{duty:.3}")])
                    .spawn()
                    .expect("starting a burner (setsid, from util-linux)")
            })
            .collect();
        Burn(children)
    }
}

impl Drop for Burn {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
