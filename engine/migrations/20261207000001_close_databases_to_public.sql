-- migrate:up
-- PostgreSQL lets PUBLIC (every role) CONNECT to a new database and create TEMPORARY
-- tables in it, and a role has no statement_timeout unless given one. So a stolen BFF or
-- Resource Domain password opened every database of the cluster, could fill temp space
-- there and run queries without end. Here:
-- * this database: PUBLIC loses CONNECT and TEMPORARY. seckill's roles keep the CONNECT
--   granted to them by name (earlier migrations); only the engine keeps TEMPORARY (its
--   COPY stage table). The owner and superusers keep everything, as always.
-- * the cluster's own databases, postgres and template1: PUBLIC loses CONNECT and
--   TEMPORARY there too (a role granted CONNECT by name, as when seckill lives in
--   postgres, keeps it). A database someone else creates is theirs to close (REVOKE ...
--   FROM PUBLIC, or pg_hba.conf).
-- * each role gets a statement_timeout above what its client waits (bff_order_timeout
--   2 s, db_timeout 10 s), so only a runaway query meets it.
-- Roles and those databases are cluster-wide and several databases (tests, benchmarks)
-- run this migration, also at the same moment: every change is made only when it is not
-- in place yet, and a concurrent run that made it first ("tuple concurrently updated")
-- is accepted once the change is seen.
DO $$
DECLARE
    db text;
    role_timeout text[];
    applied boolean;
BEGIN
    FOR db IN SELECT datname FROM pg_database
              WHERE datname IN ('postgres', 'template1', current_database()) LOOP
        FOR attempt IN 1..3 LOOP
            applied := NOT has_database_privilege('public', db, 'CONNECT')
                       AND NOT has_database_privilege('public', db, 'TEMPORARY');
            EXIT WHEN applied;
            BEGIN
                EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', db);
            EXCEPTION WHEN internal_error THEN  -- another run changed it first
                IF attempt = 3 THEN
                    RAISE;
                END IF;
                PERFORM pg_sleep(0.05 * attempt);
            END;
        END LOOP;
    END LOOP;
    FOREACH role_timeout SLICE 1 IN ARRAY ARRAY[['seckill_bff', '5s'],
                                                ['seckill_resource_domain', '30s'],
                                                ['seckill_engine', '60s']] LOOP
        FOR attempt IN 1..3 LOOP
            SELECT EXISTS (SELECT FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                           WHERE r.rolname = role_timeout[1] AND s.setdatabase = 0
                             AND 'statement_timeout=' || role_timeout[2] = ANY (s.setconfig))
              INTO applied;
            EXIT WHEN applied;
            BEGIN
                EXECUTE format('ALTER ROLE %I SET statement_timeout = %L',
                               role_timeout[1], role_timeout[2]);
            EXCEPTION WHEN internal_error THEN  -- another run changed it first
                IF attempt = 3 THEN
                    RAISE;
                END IF;
                PERFORM pg_sleep(0.05 * attempt);
            END;
        END LOOP;
    END LOOP;
END
$$;

-- migrate:down
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END
$$;
GRANT CONNECT, TEMPORARY ON DATABASE postgres TO PUBLIC;
GRANT CONNECT ON DATABASE template1 TO PUBLIC;
ALTER ROLE seckill_bff RESET statement_timeout;
ALTER ROLE seckill_resource_domain RESET statement_timeout;
ALTER ROLE seckill_engine RESET statement_timeout;
