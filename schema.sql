-- tenantd's schema, applied by every replica at every start. Each step looks in the catalog
-- first and changes only what is missing: a start against an up-to-date database takes no lock
-- on anything tenants write to (a bare `CREATE INDEX IF NOT EXISTS … ON messages` would lock
-- every partition before noticing the index exists, and wait behind any open writer).

DO $schema$
DECLARE
    partition_index text;
BEGIN
    -- Tenants: the desired state of each tenant. `version` grows with every change of `status`
    -- or `workers`; the replica running the tenant reports which version it has applied.
    IF to_regclass('tenants') IS NULL THEN
        CREATE TABLE tenants (
            id          uuid PRIMARY KEY,
            name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
            description text,
            status      text NOT NULL DEFAULT 'active'
                        CONSTRAINT tenants_status_check
                        CHECK (status IN ('active', 'inactive', 'deleting')),
            workers     integer NOT NULL DEFAULT 3 CHECK (workers >= 1),
            version     bigint NOT NULL DEFAULT 1,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
    END IF;
    -- Upgrades from a schema without `version` or without the `deleting` status.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'tenants'::regclass AND attname = 'version'
                     AND NOT attisdropped) THEN
        ALTER TABLE tenants ADD COLUMN version bigint NOT NULL DEFAULT 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'tenants'::regclass AND conname = 'tenants_status_check'
                     AND pg_get_constraintdef(oid) LIKE '%deleting%') THEN
        ALTER TABLE tenants DROP CONSTRAINT IF EXISTS tenants_status_check;
        ALTER TABLE tenants ADD CONSTRAINT tenants_status_check
            CHECK (status IN ('active', 'inactive', 'deleting'));
    END IF;
    -- Lists tenants page by page in creation order.
    IF to_regclass('tenants_created_at_id_idx') IS NULL THEN
        CREATE INDEX tenants_created_at_id_idx ON tenants (created_at, id);
    END IF;

    -- One LIST partition per tenant, named messages_<id with _ for ->, built aside and attached
    -- by tenantd when the tenant is created. A unique key must include the partition key.
    IF to_regclass('messages') IS NULL THEN
        CREATE TABLE messages (
            id         uuid NOT NULL,
            tenant_id  uuid NOT NULL,
            payload    jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id)
        ) PARTITION BY LIST (tenant_id);
    END IF;
    -- Keyset pagination, oldest first by (created_at, id) within a tenant. Built ON ONLY the
    -- parent (no partition is locked), then each partition's own index is attached to it.
    IF to_regclass('messages_tenant_created_at_id_idx') IS NULL THEN
        CREATE INDEX messages_tenant_created_at_id_idx
            ON ONLY messages (tenant_id, created_at, id);
    END IF;
    FOR partition_index IN
        SELECT ci.relname FROM pg_inherits i
        JOIN pg_index x ON x.indrelid = i.inhrelid
        JOIN pg_class ci ON ci.oid = x.indexrelid
        WHERE i.inhparent = 'messages'::regclass
          AND ci.relname = (SELECT relname FROM pg_class WHERE oid = i.inhrelid)
                           || '_created_at_id_idx'
          AND NOT EXISTS (SELECT 1 FROM pg_inherits j WHERE j.inhrelid = ci.oid)
    LOOP
        EXECUTE format('ALTER INDEX messages_tenant_created_at_id_idx ATTACH PARTITION %I',
                       partition_index);
    END LOOP;

    -- Replicas: every running tenantd. A replica is live while its session holds the advisory
    -- lock (1953391730, lock_key); the server releases it the moment that session ends.
    IF to_regclass('replicas') IS NULL THEN
        CREATE TABLE replicas (
            id         text PRIMARY KEY,
            lock_key   integer GENERATED ALWAYS AS IDENTITY UNIQUE,
            http_addr  text,
            leaving    boolean NOT NULL DEFAULT false,
            started_at timestamptz NOT NULL DEFAULT now(),
            seen_at    timestamptz NOT NULL DEFAULT now()
        );
    END IF;
    -- When the replica last answered (it updates this every second while its session works).
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'replicas'::regclass AND attname = 'seen_at'
                     AND NOT attisdropped) THEN
        ALTER TABLE replicas ADD COLUMN seen_at timestamptz NOT NULL DEFAULT now();
    END IF;
    -- The failover timeout the replica runs with (a takeover waits the owner's, not the
    -- taker's), and whether it cannot reach the broker while others can (it then takes no
    -- tenants). Both written with every heartbeat.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'replicas'::regclass AND attname = 'failover_ms'
                     AND NOT attisdropped) THEN
        ALTER TABLE replicas ADD COLUMN failover_ms integer;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'replicas'::regclass AND attname = 'broker_down'
                     AND NOT attisdropped) THEN
        ALTER TABLE replicas ADD COLUMN broker_down boolean NOT NULL DEFAULT false;
    END IF;
    -- Most tenants the replica runs (MAX_TENANTS), when capped: the plan gives it no more.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'replicas'::regclass AND attname = 'max_tenants'
                     AND NOT attisdropped) THEN
        ALTER TABLE replicas ADD COLUMN max_tenants integer;
    END IF;
    -- Live: the session holds the lock AND the heartbeat is younger than the replica's failover
    -- timeout (a stopped process keeps its session, not its heartbeats). Replaced when it is
    -- the older view, which knew only the lock.
    IF coalesce(pg_get_viewdef(to_regclass('live_replicas')), '') NOT LIKE '%max_tenants%' THEN
        CREATE OR REPLACE VIEW live_replicas AS
            SELECT r.* FROM replicas r
            WHERE EXISTS (
                SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted
                  AND l.database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())
                  AND l.classid = 1953391730::oid AND l.objid = r.lock_key::oid
                  AND l.objsubid = 2)
              AND r.seen_at > now() - make_interval(secs => coalesce(r.failover_ms, 10000) / 1000.0);
    END IF;

    -- Consumers: which replica has claimed each tenant, and how its consumer is doing. A claim
    -- by a replica that is no longer live is void; `version` is the tenant version applied.
    IF to_regclass('consumers') IS NULL THEN
        CREATE TABLE consumers (
            tenant_id  uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
            replica_id text,
            state      text NOT NULL,
            workers    integer,
            version    bigint NOT NULL DEFAULT 0,
            error      text,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX consumers_replica_id_idx ON consumers (replica_id);
    END IF;

    -- Dead letters: one row per message a tenant dead-lettered (after each of its replays),
    -- committed once the broker confirmed the letter, so that another copy of the message is
    -- acked without a second letter.
    IF to_regclass('dead_letters') IS NULL THEN
        CREATE TABLE dead_letters (
            tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
            message_id       text NOT NULL,
            replays          bigint NOT NULL,
            dead_lettered_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, message_id, replays)
        );
    END IF;
    -- Records older than a week are forgotten (by every replica's sweeper) through this index.
    IF to_regclass('dead_letters_at_idx') IS NULL THEN
        CREATE INDEX dead_letters_at_idx ON dead_letters (dead_lettered_at);
    END IF;

    -- Creates under way: a create records its tenant id before declaring the queues and
    -- deletes the record with the transaction that inserts the row. A record older than the
    -- grace with no row names queues left by an interrupted create, which a sweep removes.
    IF to_regclass('tenant_creates') IS NULL THEN
        CREATE TABLE tenant_creates (
            tenant_id  uuid PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now()
        );
    END IF;
END
$schema$;
