-- One purchase attempt, atomically. Every check comes before the first write,
-- so an error can never leave half a purchase behind: the keys the writes touch
-- are checked for their type (SISMEMBER fails on a non-set buyers key, TYPE
-- guards the stream) and the stock for a form DECR accepts.
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 order stream (one product: one hash tag)
-- ARGV: 1 user ID, 2 unix seconds
-- Reply: {1, stream entry ID, slot} accepted | {2} duplicate | {3} sold out | {0} no sale
-- Error: "SECKILL_BADSTATE ..." when a key holds something the purchase cannot use.
local stock = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not stock or not sale then
  return {0}
end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return {2}
end
-- what DECR accepts: a plain decimal integer (no blank, fraction, exponent or leading zero)
if #stock > 18 or not string.find(stock, '^[1-9]%d*$') then
  if stock == '0' or string.find(stock, '^%-[1-9]%d*$') then
    return {3}
  end
  return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[1] .. ' holds '
                           .. string.format('%q', string.sub(stock, 1, 40))
                           .. ', not an integer stock')
end
local stream_type = redis.call('TYPE', KEYS[5])['ok']
if stream_type ~= 'stream' and stream_type ~= 'none' then
  return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[5] .. ' is a ' .. stream_type
                           .. ', not a stream')
end
-- a unit handed back by a failed order is sold again before a new one
local slot = redis.call('LPOP', KEYS[4])
if not slot then
  slot = stock
end
redis.call('DECR', KEYS[1])
redis.call('SADD', KEYS[3], ARGV[1])
local id = redis.call('XADD', KEYS[5], '*', 'uid', ARGV[1], 'ts', ARGV[2],
                      'sale', sale, 'slot', slot)
return {1, id, tonumber(slot)}
