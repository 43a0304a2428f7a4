-- Claims an outbox entry whose lease has lapsed (its delivering instance died, or stopped
-- renewing it): the caller gets a new lease and the entry. Atomic, so two instances never
-- both claim one lease.
--
-- KEYS[1]  the outbox index         KEYS[2]  the item's outbox hash
-- ARGV[1]  the item id              ARGV[2]  now, ms        ARGV[3]  the new lease's end, ms
-- Returns the entry (flat field/value array), or false if it is leased or gone.
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not lease or tonumber(lease) > tonumber(ARGV[2]) then
  return false
end
local entry = redis.call('HGETALL', KEYS[2])
if #entry == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return entry
