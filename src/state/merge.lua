-- embedjoin's atomic merge of one item's parts. Redis runs a script alone, so exactly one
-- caller, from any instance, sees an item become complete.
--
-- The item's hash holds, per part type T: `s:T`, the stamp of the newest copy known (held
-- here or already part of a completion), and, while that copy waits for the others, `T`
-- (the vector, f32 little-endian) and `m:T` (its metadata JSON). `_v` is the version of the
-- item's last completion: with the stamps it is the compact record of a completed item.
--
-- KEYS[1]  the item's hash          KEYS[2]  the item's outbox hash
-- KEYS[3]  the outbox index (ids by lease expiry, ms)
-- KEYS[4]  the partial index (ids by last update, ms)
-- ARGV[1]  the item id              ARGV[2]  now, ms
-- ARGV[3]  TTL of an incomplete item, ms (a backstop: the orphan sweep acts first)
-- ARGV[4]  TTL of a completed item's record, ms
-- ARGV[5]  the lease of a new outbox entry: until then, only this caller sends it
-- ARGV[6]  n, the number of part types; ARGV[7 .. 6+n] the types
-- ARGV[7+n ..] per part to write: type, stamp, vector, metadata ('' for none)
--
-- A copy no newer than the one known is skipped: re-applying a merge whose reply was lost
-- changes nothing, and an old copy never replaces a newer one or revives a completed one.
-- Returns 0 when nothing became complete, else the completed item (flat field/value array,
-- with `_v` its version) after moving it to the outbox; the record stays.
local item, outbox = KEYS[1], KEYS[2]
local id, now, ttl, remember, lease, n = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local wrote = false
for i = 7 + n, #ARGV, 4 do
  local t, stamp = ARGV[i], ARGV[i + 1]
  local known = redis.call('HGET', item, 's:' .. t)
  if not known or tonumber(known) < tonumber(stamp) then
    redis.call('HSET', item, t, ARGV[i + 2], 's:' .. t, stamp)
    if ARGV[i + 3] == '' then
      redis.call('HDEL', item, 'm:' .. t)
    else
      redis.call('HSET', item, 'm:' .. t, ARGV[i + 3])
    end
    wrote = true
  end
end
if not wrote then
  return 0
end
for i = 7, 6 + n do
  if redis.call('HEXISTS', item, ARGV[i]) == 0 then
    redis.call('PEXPIRE', item, ttl)
    redis.call('ZADD', KEYS[4], now, id)
    return 0
  end
end
local doc, version = {}, nil
for i = 7, 6 + n do
  local t = ARGV[i]
  local got = redis.call('HMGET', item, t, 's:' .. t, 'm:' .. t)
  got[2] = got[2] or '0' -- a part stored before stamps existed
  doc[#doc + 1] = t
  doc[#doc + 1] = got[1]
  doc[#doc + 1] = 's:' .. t
  doc[#doc + 1] = got[2]
  if got[3] then
    doc[#doc + 1] = 'm:' .. t
    doc[#doc + 1] = got[3]
  end
  if not version or tonumber(got[2]) > tonumber(version) then
    version = got[2]
  end
  redis.call('HDEL', item, t, 'm:' .. t)
end
doc[#doc + 1] = '_v'
doc[#doc + 1] = version
redis.call('HSET', item, '_v', version)
redis.call('PEXPIRE', item, remember)
redis.call('ZREM', KEYS[4], id)
local queued = redis.call('HGET', outbox, '_v')
if queued and tonumber(queued) >= tonumber(version) then
  return 0 -- a newer completion already waits in the outbox
end
redis.call('DEL', outbox)
redis.call('HSET', outbox, unpack(doc))
redis.call('ZADD', KEYS[3], lease, id)
return doc
