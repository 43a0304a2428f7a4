-- An update whose document is gone from the index (deleted): its parts go back into the
-- item as waiting copies, and the item is no longer remembered as completed, so that it
-- joins again as a new item (and follows durability.orphans if the others never come).
--
-- KEYS[1]  the item's hash          KEYS[2]  the item's outbox hash
-- KEYS[3]  the outbox index         KEYS[4]  the partial index
-- KEYS[5]  the record hash of the item's bucket
-- ARGV[1]  the item id              ARGV[2]  the version the sink found no document for
-- ARGV[3]  now, ms                  ARGV[4]  TTL of an incomplete item, ms
-- Returns 1 when reopened, 0 when the entry is gone or newer (it is delivered on its own).
local queued = redis.call('HGET', KEYS[2], '_v')
if not queued or tonumber(queued) > tonumber(ARGV[2]) then
  return 0
end
local entry = redis.call('HGETALL', KEYS[2])
local fields = {}
for i = 1, #entry, 2 do
  if string.sub(entry[i], 1, 1) ~= '_' then -- `_v`, `_update`, `_orphan` are the entry's own
    fields[#fields + 1] = entry[i]
    fields[#fields + 1] = entry[i + 1]
  end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
return 1
