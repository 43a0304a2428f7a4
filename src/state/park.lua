-- Parks a document completed in memory that the sink did not take before shutdown: it
-- goes to the outbox, due at once, unless a completion as new or newer waits there.
--
-- KEYS[1]  the outbox index         KEYS[2]  the item's outbox hash
-- ARGV[1]  the item id              ARGV[2]  now, ms         ARGV[3]  its version
-- ARGV[4 ..] the entry's fields and values (as merge.lua writes them, `_v` included)
local queued = redis.call('HGET', KEYS[2], '_v')
if queued and tonumber(queued) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
