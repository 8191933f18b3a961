-- Record that the owner of a RUNNING order gives its instance back, exactly once per
-- order: the engine reads the request from the product's release stream and asks the
-- Resource Domain to delete the instance. Every check before the first write (the XADD).
-- KEYS: 1 release-requested (order stream IDs), 2 release stream, 3 waitlist stats
-- ARGV: 1 user ID, 2 instance ID, 3 the order's stream ID, 4 the order's sale ID
-- Reply: {1, release entry ID} recorded | {2} already requested
if redis.call('SISMEMBER', KEYS[1], ARGV[3]) == 1 then
  return {2}
end
local now = redis.call('TIME')
local at = now[1] * 1000 + math.floor(now[2] / 1000)
local id = redis.pcall('XADD', KEYS[2], '*', 'uid', ARGV[1], 'instance_id', ARGV[2],
                       'stream_id', ARGV[3], 'sale', ARGV[4], 'at', string.format('%d', at))
if type(id) == 'table' then
  local kind = redis.call('TYPE', KEYS[2])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('SECKILL_BADSTATE ' .. KEYS[2] .. ' is a ' .. kind
                             .. ', not a stream')
  end
  return id
end
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'released', 1)
return {1, id}
