-- One purchase attempt, atomically. Every check comes before the first write,
-- so an error can never leave half a purchase behind: the reads refuse a key of
-- another type (WRONGTYPE), the stock is checked for a form DECR accepts, and the
-- stream's XADD is the purchase's first write (a stream key of another type, or any
-- entry Redis refuses, fails it with nothing written yet; a duplicate or sold-out
-- attempt writes no entry and so does not look at the stream).
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 order stream (one product: one hash tag)
--       optional: 6 the sale's window and limits (hash: start, end in unix ms; user_rate,
--       user_burst, ip_rate, ip_burst overriding ARGV), 7 the open sale as this script
--       reads it (Keys.gate_state), 8 the user's limiter, 9 the client IP's limiter
--       (absent: no per-IP limit); 7 is passed whenever 8 is
-- ARGV: 1 user ID, 2 unix seconds; optional: 3 user rate/s, 4 user burst, 5 IP rate/s,
--       6 IP burst (the defaults of the caller; 0 = no limit), 7 a sampled attempt's
--       trace context (engine/tracing.py), written as the entry's `tp` field (absent: the
--       entry has no such field; present, 3 to 6 are too)
-- Reply: {1, stream entry ID, slot (decimal string)} accepted | {2} duplicate | {3} sold out | {0} no sale
--        | {4, retry after ms, 'user' or 'ip'} rate-limited | {5, start ms, now ms} not
--        started | {6, end ms} ended
-- Error: "SECKILL_BADSTATE ..." when a key holds something the purchase cannot use.
--
-- Every redis.call costs the one Redis thread that sells the product more than the Lua
-- around it (the arguments copied in, the reply converted back): an accepted attempt by
-- a new buyer makes six (MGET, SISMEMBER, LINDEX, XADD, DECR, SADD). What it reads:
-- - the stock, the sale ID, the gate state and the limiters in one MGET;
-- - the gate state (KEYS[7]) is the open sale as this script needs it: its ID, then its
--   own limits if it has any ("<sale>" or "<sale>\t<user_rate>\t<user_burst>\t<ip_rate>
--   \t<ip_burst>"), written when the sale is open and expiring at its end (PXAT end - 1,
--   by Redis's own clock). While it names the sale in KEYS[2] the window needs no clock:
--   the sale has started, and has not ended or the key would be gone. Otherwise (not
--   started, ended, or a sale opened without it) the window hash is read and judged by
--   Redis TIME, and once the sale is found open the gate state is written for the next
--   attempts (by open_sale at once when the sale has no start);
-- - a limiter key holds the theoretical arrival time (TAT, unix ms) of the user's or the
--   client's next attempt (GCRA). A user with no limiter key passes without a clock. An
--   accepted purchase writes no user limiter of its own: the buyers set records it, and
--   a buyer's later attempts count it as spent just now. Only a refused attempt, or a
--   limiter key already there, reads TIME and writes the TAT.
local got
if KEYS[9] then
  got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[7], KEYS[8], KEYS[9])
elseif KEYS[8] then
  got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[7], KEYS[8])
elseif KEYS[7] then
  got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[7])
else
  got = redis.call('MGET', KEYS[1], KEYS[2])
end
local stock, sale, state = got[1], got[2], got[3]
if not stock or not sale then
  return {0}
end
local ur, ub, ir, ib  -- the sale's own limits (strings), if it has any
local fill  -- the gate state to write for the next attempts, found open here
if state ~= sale then
  local id
  if state then
    id, ur, ub, ir, ib = string.match(state, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
  end
  if id ~= sale then
    local w = KEYS[6] and redis.call('HMGET', KEYS[6], 'start', 'end', 'user_rate',
                                     'user_burst', 'ip_rate', 'ip_burst') or {}
    if w[1] or w[2] then
      local now_t = redis.call('TIME')
      local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
      if w[1] and now < tonumber(w[1]) then
        return {5, tonumber(w[1]), now}
      end
      if w[2] and now >= tonumber(w[2]) then
        return {6, tonumber(w[2])}
      end
    end
    ur, ub, ir, ib = w[3], w[4], w[5], w[6]
    if KEYS[7] then
      fill = sale
      if ur or ub or ir or ib then
        fill = table.concat({sale, ur or '', ub or '', ir or '', ib or ''}, '\t')
      end
      fill = {fill, w[2]}
    end
  end
  if ur == '' then ur = nil end
  if ub == '' then ub = nil end
  if ir == '' then ir = nil end
  if ib == '' then ib = nil end
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

local user_key, user_rate = KEYS[8], tonumber(ur or ARGV[3] or 0) or 0
if user_rate <= 0 or not (got[4] or buyer or sold_out) then
  user_key = nil  -- no limit, or a new buyer's first attempt: nothing to read or write
end
local ip_key, ip_rate = KEYS[9], tonumber(ir or ARGV[5] or 0) or 0
if ip_rate <= 0 then
  ip_key = nil
end
-- GCRA: one attempt every 1000/rate ms, `burst` at once; the new TAT, or nil and the wait
local now, user_tat, ip_tat
if user_key or ip_key then
  local now_t = redis.call('TIME')
  now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
  local function gcra(tat, rate, burst)
    local interval = 1000 / rate
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
  local wait
  if user_key then
    local interval = 1000 / user_rate
    -- no key yet: a buyer's purchase counts as spent just now
    local tat = tonumber(got[4]) or (buyer and now + interval) or now
    user_tat, wait = gcra(tat, user_rate, tonumber(ub or ARGV[4] or 0) or 0)
    if not user_tat then
      return {4, wait, 'user'}
    end
  end
  if ip_key then
    ip_tat, wait = gcra(tonumber(got[5]) or now, ip_rate, tonumber(ib or ARGV[6] or 0) or 0)
    if not ip_tat then
      return {4, wait, 'ip'}
    end
  end
end

-- An attempt within its limits spends its share of them, whatever the answer, so a
-- client retrying a duplicate or a sold-out sale is slowed too; and the gate state found
-- open is written (a failure to write it, e.g. out of memory, only costs the next
-- attempt the same reads again). (Arguments go to Redis as strings: a Lua number is
-- formatted with printf on every call.)
local function spend()
  if user_tat then
    redis.call('SET', user_key, string.format('%d', user_tat), 'PX',
               tostring(math.max(1, math.ceil(user_tat - now))))
  end
  if ip_tat then
    redis.call('SET', ip_key, string.format('%d', ip_tat), 'PX',
               tostring(math.max(1, math.ceil(ip_tat - now))))
  end
  if fill then
    if fill[2] then
      redis.pcall('SET', KEYS[7], fill[1], 'PXAT', string.format('%d', tonumber(fill[2]) - 1))
    else
      redis.pcall('SET', KEYS[7], fill[1])
    end
  end
end
if buyer or sold_out then
  spend()
  return {buyer and 2 or 3}
end
-- a unit handed back by a failed order is sold again before a new one (LINDEX, a read,
-- also refuses a free-slots key of another type before anything is written)
local free = redis.call('LINDEX', KEYS[4], '0')
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
if user_tat or ip_tat or fill then
  spend()
end
return {1, id, slot}  -- (the slot as Redis holds it: the caller reads an integer)
