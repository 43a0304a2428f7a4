-- Sweeps an orphan: parts that waited longer than the partial TTL for the others.
-- (record.lua comes first.)
--
-- KEYS[1]  the item's hash          KEYS[2]  the partial index
-- KEYS[3]  the item's outbox hash   KEYS[4]  the outbox index
-- KEYS[5]  the record hash of the item's bucket
-- ARGV[1]  the item id              ARGV[2]  the deadline, ms (updated since: not an orphan)
-- ARGV[3]  the record fingerprint   ARGV[6+n], ARGV[7+n]  now and remember_completed, ms
-- ARGV[4]  '' to drop the orphan, or the lease end (ms) of its outbox entry, to deliver it
-- ARGV[5]  n, the number of part types; ARGV[6 .. 5+n] the types
--
-- Returns false if the item is not an orphan (updated since, completed since, gone, or a
-- completion of it waits in the outbox: then it is swept later); else its pending parts
-- as a flat field/value array, with `_v` their largest stamp and `_orphan` = `partial`, or
-- `late` if the item completed before (these parts came after that completion), after
-- removing them from the item and, when asked, moving them to the outbox. The record (if
-- any) stays.
local item, id = KEYS[1], ARGV[1]
local score = redis.call('ZSCORE', KEYS[2], id)
if score and tonumber(score) > tonumber(ARGV[2]) then
  return false
end
if ARGV[4] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], id)
  return false
end
redis.call('ZREM', KEYS[2], id)
local n, entry, version = tonumber(ARGV[5]), {}, nil
for i = 6, 5 + n do
  local t = ARGV[i]
  local got = redis.call('HMGET', item, t, 's:' .. t, 'm:' .. t)
  if got[1] then
    entry[#entry + 1] = t
    entry[#entry + 1] = got[1]
    entry[#entry + 1] = 's:' .. t
    entry[#entry + 1] = got[2]
    if got[3] then
      entry[#entry + 1] = 'm:' .. t
      entry[#entry + 1] = got[3]
    end
    if not version or tonumber(got[2]) > tonumber(version) then
      version = got[2]
    end
    redis.call('HDEL', item, t, 'm:' .. t)
  end
end
if not version then
  return false
end
entry[#entry + 1] = '_v'
entry[#entry + 1] = version
entry[#entry + 1] = '_orphan'
if read_record(KEYS[5], id, ARGV[3], n, ARGV[6 + n], ARGV[7 + n]) then
  entry[#entry + 1] = 'late'
else
  entry[#entry + 1] = 'partial'
end
redis.call('DEL', item)
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], unpack(entry))
  redis.call('ZADD', KEYS[4], ARGV[4], id)
end
return entry
