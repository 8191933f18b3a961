-- End a product's waitlist (its sale closes, or a new sale opens): the users still in it
-- move to the ended set, kept a while so that they read ENDED; the line and its turn
-- counter go, so no returned unit can be handed from it any more. One script, so that a
-- Redis Cluster routes it by its keys inside the caller's MULTI.
-- KEYS: 1 waitlist, 2 waitlist ended, 3 waitlist turn counter (one hash tag)
-- ARGV: 1 seconds the ended set is kept
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MIN')
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[3])
return 1
