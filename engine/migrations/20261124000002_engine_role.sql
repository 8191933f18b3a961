-- migrate:up
-- The engine's least-privilege role. Roles are cluster-wide: many databases (tests,
-- benchmarks) run this migration, so it must not fail when the role exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'seckill_engine') THEN
        CREATE ROLE seckill_engine LOGIN;
    END IF;
END
$$;
GRANT SELECT ON products TO seckill_engine;
GRANT SELECT, INSERT, UPDATE ON seckill_logs TO seckill_engine;
GRANT USAGE ON SEQUENCE seckill_logs_id_seq TO seckill_engine;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO seckill_engine',
                   current_database());
END
$$;

-- migrate:down
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM seckill_engine', current_database());
END
$$;
REVOKE ALL ON seckill_logs, products FROM seckill_engine;
REVOKE ALL ON SEQUENCE seckill_logs_id_seq FROM seckill_engine;
