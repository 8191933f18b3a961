-- migrate:up
-- Release (issue 23): an owner gives a RUNNING instance back. The engine moves its row
-- RUNNING -> RELEASING when it asks the Resource Domain to delete the instance, and the
-- status consumer RELEASING -> RELEASED when the Resource Domain reports it deleted;
-- then the unit goes to the waitlist's head or back to stock, exactly once
-- (compensated_at marks that hand-off, for a RELEASED order as for a FAILED one).
ALTER TABLE seckill_logs DROP CONSTRAINT IF EXISTS seckill_logs_status_check;
ALTER TABLE seckill_logs ADD CONSTRAINT seckill_logs_status_check
    CHECK (status IN ('PROCESSING', 'RUNNING', 'FAILED', 'RELEASING', 'RELEASED'));
-- when the Resource Domain reported the instance deleted (event time, like status_at)
ALTER TABLE seckill_logs ADD COLUMN IF NOT EXISTS released_at TIMESTAMPTZ;
-- A RELEASED order holds its unit no more than a FAILED one: the unit (its slot) is
-- sold again, to the waitlist's head or to a new buyer, whose row must not be refused.
-- A RELEASING order still holds it (the instance exists until the Resource Domain says
-- it is gone). The user may buy again after RELEASED as after FAILED: no index keeps a
-- user to one row per product (the gate's buyers set does that for live orders).
DROP INDEX IF EXISTS seckill_logs_slot_key;
CREATE UNIQUE INDEX seckill_logs_slot_key ON seckill_logs (product_id, sale_id, slot)
    WHERE status NOT IN ('FAILED', 'RELEASED');
-- No new grants: seckill_engine's table-wide SELECT, INSERT, UPDATE on seckill_logs
-- covers the new column and states; seckill_bff reads the status it already may read;
-- seckill_resource_domain keeps its own schema and never sees seckill_logs.

-- migrate:down
DROP INDEX IF EXISTS seckill_logs_slot_key;
CREATE UNIQUE INDEX seckill_logs_slot_key ON seckill_logs (product_id, sale_id, slot)
    WHERE status <> 'FAILED';
ALTER TABLE seckill_logs DROP COLUMN IF EXISTS released_at;
ALTER TABLE seckill_logs DROP CONSTRAINT IF EXISTS seckill_logs_status_check;
ALTER TABLE seckill_logs ADD CONSTRAINT seckill_logs_status_check
    CHECK (status IN ('PROCESSING', 'RUNNING', 'FAILED'));
