-- tenantd's schema. Applied by tenantd at every start; every statement is idempotent.

CREATE TABLE IF NOT EXISTS tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    description text,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    workers     integer NOT NULL DEFAULT 3 CHECK (workers >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Lists tenants page by page in creation order.
CREATE INDEX IF NOT EXISTS tenants_created_at_id_idx ON tenants (created_at, id);

-- One LIST partition per tenant, named messages_<id with _ for ->, attached by tenantd when the
-- tenant is created. A unique key must include the partition key, hence (tenant_id, id).
CREATE TABLE IF NOT EXISTS messages (
    id         uuid NOT NULL,
    tenant_id  uuid NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
) PARTITION BY LIST (tenant_id);

-- Keyset pagination: oldest first by (created_at, id) within a tenant.
CREATE INDEX IF NOT EXISTS messages_tenant_created_at_id_idx
    ON messages (tenant_id, created_at, id);
