-- migrate:up
CREATE TABLE IF NOT EXISTS products (
    id          BIGINT PRIMARY KEY,
    name        TEXT NOT NULL,
    cpus        INTEGER NOT NULL CHECK (cpus > 0),
    memory_mb   INTEGER NOT NULL CHECK (memory_mb > 0),
    gpu         TEXT NOT NULL DEFAULT '',
    image       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per order. The seed's columns keep the seed's types.
CREATE TABLE IF NOT EXISTS seckill_logs (
    id              BIGSERIAL PRIMARY KEY,
    product_id      BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    instance_id     BIGINT NOT NULL,
    stream_id       VARCHAR(64) NOT NULL,
    status          VARCHAR(20) NOT NULL DEFAULT 'PROCESSING'
                    CHECK (status IN ('PROCESSING', 'RUNNING', 'FAILED')),
    created_at      TIMESTAMPTZ DEFAULT NOW(),
    updated_at      TIMESTAMPTZ DEFAULT NOW(),
    sale_id         VARCHAR(64),     -- NULL for entries added by hand
    slot            INTEGER,         -- the unit of stock taken, 1..stock
    endpoint        TEXT,            -- from the Resource Domain's INSTANCE_RUNNING
    reason          TEXT,            -- from the Resource Domain's INSTANCE_FAILED
    status_at       TIMESTAMPTZ,     -- event time of the status applied (orders reports)
    compensated_at  TIMESTAMPTZ      -- when a failed order's unit went back to the sale
);

CREATE UNIQUE INDEX IF NOT EXISTS seckill_logs_instance_id_key ON seckill_logs (instance_id);
-- a redelivered order can never get a second row
CREATE UNIQUE INDEX IF NOT EXISTS seckill_logs_order_key ON seckill_logs (product_id, stream_id);
-- a unit of stock is held by at most one live order: if Redis ever loses a deduction and
-- sells a unit twice, the second row is refused; a FAILED order's unit goes back to the sale
CREATE UNIQUE INDEX IF NOT EXISTS seckill_logs_slot_key ON seckill_logs (product_id, sale_id, slot)
    WHERE status <> 'FAILED';
CREATE INDEX IF NOT EXISTS seckill_logs_user_idx ON seckill_logs (product_id, user_id);

-- migrate:down
DROP TABLE IF EXISTS seckill_logs;
DROP TABLE IF EXISTS products;
