-- Where a user stands in the waitlist (read only): a ZRANK, O(log n).
-- KEYS: 1 waitlist, 2 waitlist stats, 3 the sale's window, 4 waitlist ended
-- ARGV: 1 user ID
-- Reply: {1, position (1 = next), units handed out from the waitlist so far} waiting
--        | {2} was waiting when the sale ended or closed | {0} not waiting
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if rank then
  local window_end = tonumber(redis.call('HGET', KEYS[3], 'end'))
  if window_end then
    local now = redis.call('TIME')
    if now[1] * 1000 + math.floor(now[2] / 1000) >= window_end then
      return {2}
    end
  end
  return {1, rank + 1, tonumber(redis.call('HGET', KEYS[2], 'handed')) or 0}
end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return {2}
end
return {0}
