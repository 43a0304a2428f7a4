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
local item, version = KEYS[1], ARGV[3]
if redis.call('EXISTS', item) == 0 then
  -- Nothing stored (the common case): just the record.
  local record = {'_v', version}
  for i = 4, #ARGV, 2 do
    record[#record + 1] = 's:' .. ARGV[i]
    record[#record + 1] = ARGV[i + 1]
  end
  redis.call('HSET', item, unpack(record))
  redis.call('PEXPIRE', item, ARGV[2])
  return 1
end
local asked = {'_v'}
for i = 4, #ARGV, 2 do
  asked[#asked + 1] = 's:' .. ARGV[i]
end
local known = redis.call('HMGET', item, unpack(asked))
local set, del, newer = {}, {}, {}
if not known[1] or tonumber(known[1]) < tonumber(version) then
  set[#set + 1] = '_v'
  set[#set + 1] = version
end
for i = 4, #ARGV, 2 do
  local t, stamp, k = ARGV[i], ARGV[i + 1], known[(i - 4) / 2 + 2]
  if not k or tonumber(k) <= tonumber(stamp) then
    del[#del + 1] = t
    del[#del + 1] = 'm:' .. t
    set[#set + 1] = 's:' .. t
    set[#set + 1] = stamp
  else
    newer[#newer + 1] = t
  end
end
if #del > 0 then
  redis.call('HDEL', item, unpack(del))
end
if #set > 0 then
  redis.call('HSET', item, unpack(set))
end
for _, t in ipairs(newer) do
  if redis.call('HEXISTS', item, t) == 1 then
    return 0 -- a newer part waits here as a partial; it keeps its TTL
  end
end
redis.call('PEXPIRE', item, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
