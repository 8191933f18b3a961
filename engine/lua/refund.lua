-- Hand a failed order's unit of stock back to its sale, exactly once per order,
-- and only if that sale is still the open one.
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 refunded (stream IDs already handled)
-- ARGV: 1 user ID, 2 the order's sale ID, 3 slot ('' if none), 4 the order's stream ID
-- Reply: 1 refunded | 2 already refunded | 3 sale changed or closed (nothing returned)
if redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 1 then
  return 2
end
local sale = redis.call('GET', KEYS[2])
local stock = redis.call('GET', KEYS[1])
redis.call('SADD', KEYS[5], ARGV[4])
if not sale or sale ~= ARGV[2] or not stock then
  return 3
end
redis.call('INCR', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[3])
end
return 1
