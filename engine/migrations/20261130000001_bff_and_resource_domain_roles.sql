-- migrate:up
-- Least privilege for the HTTP gate and the Resource Domain, like seckill_engine.
-- seckill_bff reads one customer's latest order: exactly these columns, nothing else
-- (no stream_id, sale, slot, products, and no write at all).
-- seckill_resource_domain owns its own schema and never sees seckill_logs.
-- Roles are cluster-wide: many databases (tests, benchmarks) run this migration.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'seckill_bff') THEN
        CREATE ROLE seckill_bff LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'seckill_resource_domain') THEN
        CREATE ROLE seckill_resource_domain LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO seckill_bff, seckill_resource_domain',
                   current_database());
END
$$;
GRANT SELECT (id, product_id, user_id, status, instance_id, endpoint, reason, compensated_at)
    ON seckill_logs TO seckill_bff;
-- The Resource Domain's tables are its own: it creates them at start (IF NOT EXISTS),
-- which needs only its schema, not the database's CREATE privilege.
CREATE SCHEMA IF NOT EXISTS resource_domain AUTHORIZATION seckill_resource_domain;
ALTER SCHEMA resource_domain OWNER TO seckill_resource_domain;
DO $$
BEGIN
    IF to_regclass('resource_domain.instances') IS NOT NULL THEN
        ALTER TABLE resource_domain.instances OWNER TO seckill_resource_domain;
    END IF;
END
$$;

-- migrate:down
ALTER SCHEMA resource_domain OWNER TO CURRENT_USER;
DO $$
BEGIN
    IF to_regclass('resource_domain.instances') IS NOT NULL THEN
        ALTER TABLE resource_domain.instances OWNER TO CURRENT_USER;
    END IF;
END
$$;
REVOKE ALL ON seckill_logs FROM seckill_bff;
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM seckill_bff, seckill_resource_domain',
                   current_database());
END
$$;
