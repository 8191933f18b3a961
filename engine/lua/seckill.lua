-- One purchase attempt, atomically. Every check comes before the first write,
-- so an error can never leave half a purchase behind: the keys the writes touch
-- are checked for their type (SISMEMBER fails on a non-set buyers key, TYPE
-- guards the stream) and the stock for a form DECR accepts.
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 order stream (one product: one hash tag)
--       optional: 6 the sale's window and limits (hash: start, end in unix ms; user_rate,
--       user_burst, ip_rate, ip_burst overriding ARGV), 7 the user's limiter, 8 the client
--       IP's limiter ('' or absent: no per-IP limit)
-- ARGV: 1 user ID, 2 unix seconds; optional: 3 user rate/s, 4 user burst, 5 IP rate/s,
--       6 IP burst (the defaults of the caller; 0 = no limit)
-- Reply: {1, stream entry ID, slot} accepted | {2} duplicate | {3} sold out | {0} no sale
--        | {4, retry after ms, 'user' or 'ip'} rate-limited | {5, start ms, now ms} not
--        started | {6, end ms} ended
-- Time is Redis TIME: one clock for every BFF process, whatever their own clocks say.
-- Error: "SECKILL_BADSTATE ..." when a key holds something the purchase cannot use.
local stock = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not stock or not sale then
  return {0}
end
local window = {false, false, false, false, false, false}
if KEYS[6] then
  window = redis.call('HMGET', KEYS[6], 'start', 'end', 'user_rate', 'user_burst', 'ip_rate',
                      'ip_burst')
end
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
if window[1] and now < tonumber(window[1]) then
  return {5, tonumber(window[1]), now}
end
if window[2] and now >= tonumber(window[2]) then
  return {6, tonumber(window[2])}
end

-- GCRA: a limiter key holds the theoretical arrival time (ms) of the next request; one
-- request every 1000/rate ms, `burst` at once. Returns the new TAT, or nil and the wait.
local function gcra(key, rate, burst)
  if not key or key == '' or rate <= 0 then
    return nil, 0
  end
  local interval = 1000 / rate
  local tat = tonumber(redis.call('GET', key) or 0) or 0
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
local function num(value, default)
  return tonumber(value or default or 0) or 0
end
local user_tat, user_wait = gcra(KEYS[7], num(window[3], ARGV[3]), num(window[4], ARGV[4]))
if user_wait > 0 then
  return {4, user_wait, 'user'}
end
local ip_tat, ip_wait = gcra(KEYS[8], num(window[5], ARGV[5]), num(window[6], ARGV[6]))
if ip_wait > 0 then
  return {4, ip_wait, 'ip'}
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
local stream_type = redis.call('TYPE', KEYS[5])['ok']
if stream_type ~= 'stream' and stream_type ~= 'none' then
  return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[5] .. ' is a ' .. stream_type
                           .. ', not a stream')
end
local buyer = redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1

-- every check passed: the writes. An attempt within its limits spends its share of them,
-- whatever the answer, so a client retrying a duplicate or a sold-out sale is slowed too.
for _, limiter in ipairs({{KEYS[7], user_tat}, {KEYS[8], ip_tat}}) do
  if limiter[2] then
    redis.call('SET', limiter[1], string.format('%d', limiter[2]), 'PX',
               math.max(1, math.ceil(limiter[2] - now)))
  end
end
if buyer then
  return {2}
end
if sold_out then
  return {3}
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
