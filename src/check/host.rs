//! This host's limits as the process reading them is bound by them: its own file and process
//! limits, the kernel's map count, its cgroup's task limit and the memory available, read from
//! `/proc` and `/sys`. Run as the unit's `ExecStartPre`, they are the limits tenantd gets.

use std::path::Path;

/// A limit that may be absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Unlimited,
    At(u64),
}

/// The soft limit on open files (`RLIMIT_NOFILE`).
pub fn open_files() -> Option<Bound> {
    soft_limit(&read("/proc/self/limits")?, "Max open files")
}

/// The soft limit on the tasks of this user (`RLIMIT_NPROC`): threads count.
pub fn processes() -> Option<Bound> {
    soft_limit(&read("/proc/self/limits")?, "Max processes")
}

/// `vm.max_map_count`: the memory maps one process may hold.
pub fn max_map_count() -> Option<u64> {
    read("/proc/sys/vm/max_map_count")?.trim().parse().ok()
}

/// The smallest `pids.max` of this process's cgroup and its ancestors (systemd's `TasksMax=`).
pub fn tasks_max() -> Option<Bound> {
    let (base, path) = pids_cgroup(&read("/proc/self/cgroup")?)?;
    let mut found = None;
    let mut dir = Some(Path::new(&path));
    while let Some(d) = dir {
        let file = Path::new(base)
            .join(d.strip_prefix("/").unwrap_or(d))
            .join("pids.max");
        if let Ok(raw) = std::fs::read_to_string(file) {
            let bound = match raw.trim() {
                "max" => Bound::Unlimited,
                n => Bound::At(n.parse().ok()?),
            };
            found = Some(tighter(found.unwrap_or(Bound::Unlimited), bound));
        }
        dir = d.parent();
    }
    // The root cgroup has no pids.max: a controller found but no file means no limit.
    Some(found.unwrap_or(Bound::Unlimited))
}

/// Bytes of memory available to new work now (`MemAvailable`).
pub fn memory_available() -> Option<u64> {
    let meminfo = read("/proc/meminfo")?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether this process runs as root, to whom `RLIMIT_NPROC` does not apply.
pub fn is_root() -> bool {
    let status = read("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .is_some_and(|effective| effective == "0")
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn tighter(a: Bound, b: Bound) -> Bound {
    match (a, b) {
        (Bound::At(x), Bound::At(y)) => Bound::At(x.min(y)),
        (Bound::At(x), Bound::Unlimited) | (Bound::Unlimited, Bound::At(x)) => Bound::At(x),
        (Bound::Unlimited, Bound::Unlimited) => Bound::Unlimited,
    }
}

/// A soft limit of `/proc/<pid>/limits`: `Max open files  1024  4096  files`.
pub fn soft_limit(limits: &str, name: &str) -> Option<Bound> {
    let rest = limits.lines().find_map(|l| l.strip_prefix(name))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(Bound::Unlimited),
        n => n.parse().ok().map(Bound::At),
    }
}

/// Where the pids controller of this process is: the cgroup v1 `pids` hierarchy when mounted,
/// else the unified (v2) hierarchy.
fn pids_cgroup(cgroup: &str) -> Option<(&'static str, String)> {
    let mut unified = None;
    for line in cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.split(',').any(|c| c == "pids") {
            return Some(("/sys/fs/cgroup/pids", path.to_string()));
        }
        if controllers.is_empty() {
            unified = Some(("/sys/fs/cgroup", path.to_string()));
        }
    }
    unified
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limits_are_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96367                96367                processes \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(Bound::At(1024)));
        assert_eq!(soft_limit(limits, "Max processes"), Some(Bound::At(96367)));
        assert_eq!(
            soft_limit(limits, "Max locked memory"),
            Some(Bound::Unlimited)
        );
        assert_eq!(soft_limit(limits, "Max realtime timeout"), None);
    }

    #[test]
    fn the_pids_controller_is_found_in_either_hierarchy() {
        let v1 = "9:name=systemd:/\n8:pids:/system.slice/tenantd.service\n0::/\n";
        assert_eq!(
            pids_cgroup(v1),
            Some((
                "/sys/fs/cgroup/pids",
                "/system.slice/tenantd.service".into()
            ))
        );
        let v2 = "0::/system.slice/tenantd.service\n";
        assert_eq!(
            pids_cgroup(v2),
            Some(("/sys/fs/cgroup", "/system.slice/tenantd.service".into()))
        );
    }

    #[test]
    fn this_host_answers() {
        assert!(open_files().is_some());
        assert!(max_map_count().is_some_and(|n| n > 0));
        assert!(memory_available().is_some_and(|n| n > 0));
        assert!(tasks_max().is_some());
    }
}
