-- migrate:up
-- An owner's DELETE .../order records a release request naming the order by its stream
-- entry and sale IDs (the release stream's contract): the BFF reads those two columns of
-- the caller's latest order too. Still no slot, no products, and no write at all.
GRANT SELECT (stream_id, sale_id) ON seckill_logs TO seckill_bff;

-- migrate:down
REVOKE SELECT (stream_id, sale_id) ON seckill_logs FROM seckill_bff;
