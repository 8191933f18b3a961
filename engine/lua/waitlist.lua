-- Join the waitlist of a sold-out sale, atomically: every check before the first write,
-- the same window and the same rate limits (the same limiter keys) as a purchase, so a
-- client hammering both endpoints spends one budget. First come, first served: a turn
-- is the next value of the sale's counter; a position is a ZRANK (O(log n)).
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 waitlist, 5 waitlist turn counter, 6 the sale's
--       window and limits (hash: start, end, user_rate, user_burst, ip_rate, ip_burst,
--       waitlist_max), 7 the user's limiter, 8 the client IP's limiter (absent: none)
-- ARGV: 1 user ID, 2 waitlist max (the sale's `waitlist_max` wins), 3 user rate/s,
--       4 user burst, 5 IP rate/s, 6 IP burst (the caller's defaults; 0 = no limit)
-- Reply: {1, position} joined | {7, position} already waiting | {2} holds a live order
--        | {3} stock left (buy instead) | {8, max} waitlist full | {0} no sale
--        | {4, retry after ms, 'user' or 'ip'} rate-limited | {5, start ms, now ms} not
--        started | {6, end ms} ended
-- Error: "SECKILL_BADSTATE ..." when the stock is not an integer.
local stock = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not stock or not sale then
  return {0}
end
local window = redis.call('HMGET', KEYS[6], 'start', 'end', 'user_rate', 'user_burst',
                          'ip_rate', 'ip_burst', 'waitlist_max')
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
if window[1] and now < tonumber(window[1]) then
  return {5, tonumber(window[1]), now}
end
if window[2] and now >= tonumber(window[2]) then
  return {6, tonumber(window[2])}
end

-- GCRA, as in seckill.lua: a limiter key holds the theoretical arrival time (ms)
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
local user_key, user_rate = KEYS[7], tonumber(window[3] or ARGV[3] or 0) or 0
local ip_key, ip_rate = KEYS[8], tonumber(window[5] or ARGV[5] or 0) or 0
local user_tat, ip_tat, wait
if user_key and user_rate > 0 then
  user_tat, wait = gcra(user_key, user_rate, tonumber(window[4] or ARGV[4] or 0) or 0)
  if not user_tat then
    return {4, wait, 'user'}
  end
end
if ip_key and ip_key ~= '' and ip_rate > 0 then
  ip_tat, wait = gcra(ip_key, ip_rate, tonumber(window[6] or ARGV[6] or 0) or 0)
  if not ip_tat then
    return {4, wait, 'ip'}
  end
end
local left = tonumber(stock)
if not left or not string.find(stock, '^%-?%d+$') then
  return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[1] .. ' holds '
                           .. string.format('%q', string.sub(stock, 1, 40))
                           .. ', not an integer stock')
end
local buyer = redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1
local rank = redis.call('ZRANK', KEYS[4], ARGV[1])
local size = redis.call('ZCARD', KEYS[4])
local most = tonumber(window[7] or ARGV[2]) or 0

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
local reply
if buyer then
  reply = {2}
elseif rank then
  reply = {7, rank + 1}
elseif left > 0 then
  reply = {3}
elseif size >= most then
  reply = {8, most}
end
if reply then
  spend()
  return reply
end
local turn = redis.call('INCR', KEYS[5])
redis.call('ZADD', KEYS[4], turn, ARGV[1])
spend()
return {1, redis.call('ZRANK', KEYS[4], ARGV[1]) + 1}
