-- Records completions that happened in a shard's memory, so that the store agrees with
-- them: a stored copy of a part no newer than the completed one is dropped (nothing of a
-- completed item stays behind as a partial), and the stamps are remembered, so that an
-- older copy arriving later, or a merge re-applied after a lost reply, changes nothing.
-- A stored copy newer than the completed one stays: it is a part that came after.
--
-- KEYS[1]  the item's hash          KEYS[2]  the partial index
-- ARGV[1]  the item id              ARGV[2]  TTL of a completed item's record, ms
-- ARGV[3]  the completion's version
-- ARGV[4 ..] per part: type, stamp
local item = KEYS[1]
for i = 4, #ARGV, 2 do
  local t, stamp = ARGV[i], ARGV[i + 1]
  local known = redis.call('HGET', item, 's:' .. t)
  if not known or tonumber(known) <= tonumber(stamp) then
    redis.call('HDEL', item, t, 'm:' .. t)
    redis.call('HSET', item, 's:' .. t, stamp)
  end
end
local done = redis.call('HGET', item, '_v')
if not done or tonumber(done) < tonumber(ARGV[3]) then
  redis.call('HSET', item, '_v', ARGV[3])
end
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', item, ARGV[i]) == 1 then
    return 0 -- a newer part waits here as a partial; it keeps its TTL
  end
end
redis.call('PEXPIRE', item, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
