-- Hand a returned unit of stock (a failed order's, a released instance's) on, exactly
-- once per order, and only if that order's sale is still the open one: to the first
-- user waiting for one (a new order in the sale's stream, with the returned slot,
-- `from` = 'waitlist' and the user's `turn` in the line), or, with nobody waiting or once the sale's window has ended,
-- back to stock. Either way the returning user is no buyer any more (may buy or wait
-- again). Every check comes before the first write (the XADD of a handoff, which a
-- stream key of another type fails with nothing written).
-- KEYS: 1 stock, 2 sale, 3 buyers, 4 free slots, 5 refunded (stream IDs already handled),
--       6 waitlist, 7 order stream, 8 the sale's window, 9 waitlist stats (one hash tag)
-- ARGV: 1 user ID, 2 the order's sale ID, 3 slot ('' if none), 4 the order's stream ID
-- Reply: 1 back to stock | 2 already returned | 3 sale changed or closed (nothing returned)
--        | {4, user ID, new stream entry ID} handed to the first waiting user
if redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 1 then
  return 2
end
local sale = redis.call('GET', KEYS[2])
local stock = redis.call('GET', KEYS[1])
if not sale or sale ~= ARGV[2] or not stock then
  redis.call('SADD', KEYS[5], ARGV[4])
  return 3
end
local now = redis.call('TIME')
local ended = false
local window_end = tonumber(redis.call('HGET', KEYS[8], 'end'))
if window_end then
  ended = now[1] * 1000 + math.floor(now[2] / 1000) >= window_end
end

-- the head of the line: the first waiting user who holds no order (one who does, say
-- bought in a sale reopened meanwhile, is dropped from the line)
local head, turn, stale = nil, nil, {}
if not ended and ARGV[3] ~= '' then
  local at = 0
  while true do
    local first = redis.call('ZRANGE', KEYS[6], at, at, 'WITHSCORES')
    if not first[1] then
      break
    end
    if redis.call('SISMEMBER', KEYS[3], first[1]) == 0 then
      head, turn = first[1], first[2]
      break
    end
    stale[#stale + 1] = first[1]
    at = at + 1
  end
end

local reply = 1
if head then
  local id = redis.pcall('XADD', KEYS[7], '*', 'uid', head, 'ts', now[1], 'sale', sale,
                         'slot', ARGV[3], 'from', 'waitlist', 'turn', turn)
  if type(id) == 'table' then
    local kind = redis.call('TYPE', KEYS[7])['ok']
    if kind ~= 'stream' and kind ~= 'none' then
      return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[7] .. ' is a ' .. kind
                               .. ', not a stream')
    end
    return id  -- Redis refused the write itself: nothing was written
  end
  redis.call('ZREM', KEYS[6], head)
  redis.call('SADD', KEYS[3], head)
  redis.call('HINCRBY', KEYS[9], 'handed', 1)
  reply = {4, head, id}
else
  redis.call('INCR', KEYS[1])
  if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[4], ARGV[3])
  end
end
if #stale > 0 then
  redis.call('ZREM', KEYS[6], unpack(stale))
end
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[1])
return reply
