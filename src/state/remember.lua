-- Records completions that happened in a shard's memory, so that the store agrees with
-- them: a stored copy of a part no newer than the completed one is dropped (nothing of a
-- completed item stays behind as a partial), and the stamps are remembered, so that an
-- older copy arriving later, or a merge re-applied after a lost reply, changes nothing.
-- A stored copy newer than the completed one stays: it is a part that came after. With
-- updates on (late_parts), it moves to the item's outbox entry as an update, due at once.
--
-- KEYS[1]  the item's hash          KEYS[2]  the partial index
-- KEYS[3]  the item's outbox hash   KEYS[4]  the outbox index
-- ARGV[1]  the item id              ARGV[2]  TTL of a completed item's record, ms
-- ARGV[3]  the completion's version ARGV[4]  '1' when later copies update the document
-- ARGV[5]  now, ms
-- ARGV[6 ..] per part: type, stamp
local item, version = KEYS[1], ARGV[3]
local first = 6
if redis.call('EXISTS', item) == 0 then
  -- Nothing stored (the common case): just the record.
  local record = {'_v', version}
  for i = first, #ARGV, 2 do
    record[#record + 1] = 's:' .. ARGV[i]
    record[#record + 1] = ARGV[i + 1]
  end
  redis.call('HSET', item, unpack(record))
  redis.call('PEXPIRE', item, ARGV[2])
  return 1
end
local asked = {'_v'}
for i = first, #ARGV, 2 do
  asked[#asked + 1] = 's:' .. ARGV[i]
end
local known = redis.call('HMGET', item, unpack(asked))
local set, del, newer = {}, {}, {}
if not known[1] or tonumber(known[1]) < tonumber(version) then
  set[#set + 1] = '_v'
  set[#set + 1] = version
end
for i = first, #ARGV, 2 do
  local t, stamp, k = ARGV[i], ARGV[i + 1], known[(i - first) / 2 + 2]
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
local waiting = {}
for _, t in ipairs(newer) do
  if redis.call('HEXISTS', item, t) == 1 then
    waiting[#waiting + 1] = t
  end
end
if #waiting > 0 and ARGV[4] ~= '1' then
  return 0 -- a newer part waits here as a partial; it keeps its TTL
end
if #waiting > 0 then
  -- Newer parts that came before this completion was recorded update its document.
  local fields, v = {}, tonumber(redis.call('HGET', KEYS[3], '_v') or '0')
  if redis.call('EXISTS', KEYS[3]) == 0 then
    fields = {'_update', '1'}
  end
  for _, t in ipairs(waiting) do
    local got = redis.call('HMGET', item, t, 's:' .. t, 'm:' .. t)
    fields[#fields + 1] = t
    fields[#fields + 1] = got[1]
    fields[#fields + 1] = 's:' .. t
    fields[#fields + 1] = got[2]
    if got[3] then
      fields[#fields + 1] = 'm:' .. t
      fields[#fields + 1] = got[3]
    end
    v = math.max(v, tonumber(got[2]))
    redis.call('HDEL', item, t, 'm:' .. t)
  end
  fields[#fields + 1] = '_v'
  fields[#fields + 1] = string.format('%d', v)
  redis.call('HSET', KEYS[3], unpack(fields))
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
end
redis.call('PEXPIRE', item, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
