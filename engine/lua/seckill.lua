-- One purchase attempt, atomically. Every check comes before the first write,
-- so an error can never leave half a purchase behind: the reads refuse a key of
-- another type (WRONGTYPE), the stock is checked for a form DECR accepts, and the
-- stream's XADD is the purchase's first write (a stream key of another type, or any
-- entry Redis refuses, fails it with nothing written yet; a duplicate or sold-out
-- attempt writes no entry and so does not look at the stream).
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 order stream (one product: one hash tag)
--       optional: 6 the sale's window and limits (hash: start, end in unix ms; user_rate,
--       user_burst, ip_rate, ip_burst overriding ARGV), 7 the user's limiter, 8 the client
--       IP's limiter ('' or absent: no per-IP limit)
-- ARGV: 1 user ID, 2 unix seconds; optional: 3 user rate/s, 4 user burst, 5 IP rate/s,
--       6 IP burst (the defaults of the caller; 0 = no limit), 7 a sampled attempt's
--       trace context (engine/tracing.py), written as the entry's `tp` field (absent: the
--       entry has no such field)
-- Reply: {1, stream entry ID, slot} accepted | {2} duplicate | {3} sold out | {0} no sale
--        | {4, retry after ms, 'user' or 'ip'} rate-limited | {5, start ms, now ms} not
--        started | {6, end ms} ended
-- Time is Redis TIME, read only when a window or a limit needs it: one clock for every
-- BFF process, whatever their own clocks say.
-- Error: "SECKILL_BADSTATE ..." when a key holds something the purchase cannot use.
-- Every redis.call costs the one Redis thread that sells the product more than the Lua
-- around it (the arguments copied in, the reply parsed back): read only what decides the
-- answer, write only what the attempt changes.
local stock = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not stock or not sale then
  return {0}
end
local window = KEYS[6] and redis.call('HMGET', KEYS[6], 'start', 'end', 'user_rate',
                                      'user_burst', 'ip_rate', 'ip_burst') or {}
local user_key, user_rate = KEYS[7], tonumber(window[3] or ARGV[3] or 0) or 0
if user_rate <= 0 then
  user_key = nil
end
local ip_key, ip_rate = KEYS[8], tonumber(window[5] or ARGV[5] or 0) or 0
if ip_key == '' or ip_rate <= 0 then
  ip_key = nil
end
local now = 0
if window[1] or window[2] or user_key or ip_key then
  local now_t = redis.call('TIME')
  now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
  if window[1] and now < tonumber(window[1]) then
    return {5, tonumber(window[1]), now}
  end
  if window[2] and now >= tonumber(window[2]) then
    return {6, tonumber(window[2])}
  end
end

-- GCRA: a limiter key holds the theoretical arrival time (ms) of the next request; one
-- request every 1000/rate ms, `burst` at once. Returns the new TAT, or nil and the wait.
local function gcra(key, rate, burst)
  local interval = 1000 / rate
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local over = new_tat - now - interval * math.max(burst, 1)
  if over > 0 then
    return nil, math.ceil(over)
  end
  return new_tat, 0
end
local user_tat, ip_tat, wait
if user_key then
  user_tat, wait = gcra(user_key, user_rate, tonumber(window[4] or ARGV[4] or 0) or 0)
  if not user_tat then
    return {4, wait, 'user'}
  end
end
if ip_key then
  ip_tat, wait = gcra(ip_key, ip_rate, tonumber(window[6] or ARGV[6] or 0) or 0)
  if not ip_tat then
    return {4, wait, 'ip'}
  end
end

-- what DECR accepts: a plain decimal integer (no blank, fraction, exponent or leading zero)
local sold_out = false
if #stock > 18 or not string.find(stock, '^[1-9]%d*$') then
  if stock == '0' or string.find(stock, '^%-[1-9]%d*$') then
    sold_out = true
  else
    return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[1] .. ' holds '
                             .. string.format('%q', string.sub(stock, 1, 40))
                             .. ', not an integer stock')
  end
end
local buyer = redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1

-- An attempt within its limits spends its share of them, whatever the answer, so a
-- client retrying a duplicate or a sold-out sale is slowed too.
local function spend()
  if user_tat then
    redis.call('SET', user_key, string.format('%d', user_tat), 'PX',
               math.max(1, math.ceil(user_tat - now)))
  end
  if ip_tat then
    redis.call('SET', ip_key, string.format('%d', ip_tat), 'PX',
               math.max(1, math.ceil(ip_tat - now)))
  end
end
if buyer or sold_out then
  spend()
  return {buyer and 2 or 3}
end
-- a unit handed back by a failed order is sold again before a new one (LINDEX, a read,
-- also refuses a free-slots key of another type before anything is written)
local free = redis.call('LINDEX', KEYS[4], 0)
local slot = free or stock
local id
if ARGV[7] then
  id = redis.pcall('XADD', KEYS[5], '*', 'uid', ARGV[1], 'ts', ARGV[2],
                   'sale', sale, 'slot', slot, 'tp', ARGV[7])
else
  id = redis.pcall('XADD', KEYS[5], '*', 'uid', ARGV[1], 'ts', ARGV[2],
                   'sale', sale, 'slot', slot)
end
if type(id) == 'table' then
  local kind = redis.call('TYPE', KEYS[5])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[5] .. ' is a ' .. kind
                             .. ', not a stream')
  end
  return id  -- Redis refused the write itself (memory, replicas): nothing was written
end
if free then
  redis.call('LPOP', KEYS[4])
end
redis.call('DECR', KEYS[1])
redis.call('SADD', KEYS[3], ARGV[1])
spend()
return {1, id, tonumber(slot)}
