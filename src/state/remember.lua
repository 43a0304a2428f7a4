-- Records completions that happened in a shard's memory, so that the store agrees with
-- them: a waiting copy of a part no newer than the completed one is dropped (nothing of a
-- completed item stays behind as a partial), and the record remembers the stamps, so that
-- an older copy arriving later, or a merge re-applied after a lost reply, changes nothing.
-- A waiting copy newer than the completed one stays: it is a part that came after. With
-- updates on (late_parts), it moves to the item's outbox entry as an update, due at once.
-- (record.lua comes first.)
--
-- KEYS[1]  the item's hash          KEYS[2]  the partial index
-- KEYS[3]  the item's outbox hash   KEYS[4]  the outbox index
-- KEYS[5]  the record hash of the item's bucket
-- ARGV[1]  the item id              ARGV[2]  how long a completed item is remembered, ms
-- ARGV[3]  the completion's version ARGV[4]  '1' when later copies update the document
-- ARGV[5]  now, ms                  ARGV[6]  the record fingerprint
-- ARGV[7 ..] per part, in configured order: type, stamp
local item, id, version = KEYS[1], ARGV[1], tonumber(ARGV[3])
local records = KEYS[5]
local first, n = 7, (#ARGV - 6) / 2
local done, recorded = read_record(records, id, ARGV[6], n, ARGV[5], ARGV[2])
local stamps = {}
for j = 1, n do
  local s = tonumber(ARGV[first + 2 * j - 1])
  stamps[j] = math.max(s, recorded and recorded[j] or 0)
end
write_record(records, id, ARGV[6], ARGV[5], math.max(version, done or 0), stamps)
if redis.call('EXISTS', item) == 0 then
  return 1 -- nothing waits (the common case)
end
local moved, v = {}, 0
for j = 1, n do
  local t = ARGV[first + 2 * j - 2]
  local s = tonumber(redis.call('HGET', item, 's:' .. t))
  if s and s <= tonumber(ARGV[first + 2 * j - 1]) then
    redis.call('HDEL', item, t, 's:' .. t, 'm:' .. t)
  elseif s and ARGV[4] == '1' then
    -- A newer copy that came before this completion was recorded updates its document.
    local got = redis.call('HMGET', item, t, 'm:' .. t)
    moved[#moved + 1] = t
    moved[#moved + 1] = got[1]
    moved[#moved + 1] = 's:' .. t
    moved[#moved + 1] = string.format('%d', s)
    if got[2] then
      moved[#moved + 1] = 'm:' .. t
      moved[#moved + 1] = got[2]
    end
    v = math.max(v, s)
    redis.call('HDEL', item, t, 's:' .. t, 'm:' .. t)
  end
end
if #moved > 0 then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    moved[#moved + 1] = '_update'
    moved[#moved + 1] = '1'
  end
  v = math.max(v, tonumber(redis.call('HGET', KEYS[3], '_v') or '0'))
  moved[#moved + 1] = '_v'
  moved[#moved + 1] = string.format('%d', v)
  redis.call('HSET', KEYS[3], unpack(moved))
  redis.call('ZADD', KEYS[4], ARGV[5], id)
end
if redis.call('EXISTS', item) == 0 then
  redis.call('ZREM', KEYS[2], id)
end
return 1
