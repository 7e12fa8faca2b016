//! What a replica may hold in memory at worst, said in `--help` and the README's Limits: the
//! consumers' unacked messages (a count of whole messages, so bytes only through the broker's
//! `max_message_size`), the HTTP guard's budgets, and the pages the request threads build.

const MIB: usize = 1024 * 1024;

/// The settings the worst case follows.
pub struct Sizes {
    pub workers: usize,
    pub batch: usize,
    pub message_bytes: usize,
    pub connections: usize,
}

/// The worst case with these settings, as `--help` ends (with the defaults).
pub fn worst_case(sizes: &Sizes) -> String {
    let Sizes {
        workers,
        batch,
        message_bytes: bytes,
        connections,
    } = *sizes;
    let per_tenant = workers * batch * bytes;
    format!(
        "\nMemory at worst, per replica:\n  \
         consumers: for each tenant it runs, workers x BATCH_SIZE unacked messages of up to\n  \
         MAX_MESSAGE_BYTES each, or of the broker's max_message_size when that is larger\n  \
         (RabbitMQ 3.x: 128 MiB; set it to MAX_MESSAGE_BYTES); with the defaults\n  \
         {workers} x {batch} x {} MiB = {} MiB a tenant, {} GiB for 1,000 tenants\n  \
         HTTP guard: {}\n  \
         request threads: {} pages being built at once, each at most {} MiB of payloads, held\n  \
         twice (rows, then JSON)\n",
        bytes / MIB,
        per_tenant / MIB,
        (per_tenant * 1000 + 512 * MIB) / (1024 * MIB),
        crate::http::memory_budget(connections),
        crate::http::REQUEST_THREADS,
        crate::service::PAGE_PAYLOAD_BYTES / MIB,
    )
}
