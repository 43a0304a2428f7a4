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
-- ARGV[6]  '1' when a newer copy for a completed item updates its document (late_parts)
-- ARGV[7]  n, the number of part types; ARGV[8 .. 7+n] the types
-- ARGV[8+n ..] per part to write: type, stamp, vector, metadata ('' for none)
--
-- A copy no newer than the one known is skipped: re-applying a merge whose reply was lost
-- changes nothing, and an old copy never replaces a newer one or revives a completed one.
-- Returns 0 when nothing became complete, else the completed item (flat field/value array,
-- with `_v` its version) after moving it to the outbox; the record stays.
--
-- With updates on, newer copies for a remembered completed item go to its outbox entry
-- instead (made with `_update` = 1 if there is none; a completion waiting there takes them
-- in), leased to the caller, and the entry is returned as for a completion.
local item, outbox = KEYS[1], KEYS[2]
local id, now, ttl, remember, lease, update = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1'
local n = tonumber(ARGV[7])
local first = 8 + n
-- Every part type's known stamp, and the last completion's version: one call.
local asked, slot = {}, {}
for i = 8, 7 + n do
  asked[#asked + 1] = 's:' .. ARGV[i]
  slot[ARGV[i]] = #asked
end
asked[#asked + 1] = '_v'
local known = redis.call('HMGET', item, unpack(asked))
local done = known[n + 1]
local set, del, wrote = {}, {}, {}
for i = first, #ARGV, 4 do
  local t, stamp = ARGV[i], ARGV[i + 1]
  local k = known[slot[t]]
  if not k or tonumber(k) < tonumber(stamp) then
    set[#set + 1] = t
    set[#set + 1] = ARGV[i + 2]
    set[#set + 1] = 's:' .. t
    set[#set + 1] = stamp
    if ARGV[i + 3] ~= '' then
      set[#set + 1] = 'm:' .. t
      set[#set + 1] = ARGV[i + 3]
    elseif k then
      del[#del + 1] = 'm:' .. t -- the older copy's metadata goes with it
    end
    wrote[t] = true
    known[slot[t]] = stamp
  end
end
if #set == 0 then
  return 0
end
if update and done then
  -- The item's document is indexed (or on its way): these copies update it.
  local stamps, version = {}, tonumber(redis.call('HGET', outbox, '_v') or '0')
  for i = 1, #set, 2 do
    if string.sub(set[i], 1, 2) == 's:' then
      stamps[#stamps + 1] = set[i]
      stamps[#stamps + 1] = set[i + 1]
      version = math.max(version, tonumber(set[i + 1]))
    end
  end
  if redis.call('EXISTS', outbox) == 0 then
    redis.call('HSET', outbox, '_update', '1')
  end
  redis.call('HSET', outbox, '_v', string.format('%d', version), unpack(set))
  if #del > 0 then
    redis.call('HDEL', outbox, unpack(del))
  end
  redis.call('HSET', item, unpack(stamps))
  redis.call('PEXPIRE', item, remember)
  redis.call('ZADD', KEYS[3], lease, id)
  return redis.call('HGETALL', outbox)
end
redis.call('HSET', item, unpack(set))
if #del > 0 then
  redis.call('HDEL', item, unpack(del))
end
for i = 8, 7 + n do
  if not wrote[ARGV[i]] and redis.call('HEXISTS', item, ARGV[i]) == 0 then
    redis.call('PEXPIRE', item, ttl)
    redis.call('ZADD', KEYS[4], now, id)
    return 0
  end
end
-- Complete: the hash moves to the outbox as it is (RENAME: no vector is copied), and the
-- item's key starts again as the record: the parts' stamps and the version.
local record, version = {}, nil
for j = 1, n do
  local stamp = known[j] or '0' -- a part stored before stamps existed
  record[#record + 1] = asked[j]
  record[#record + 1] = stamp
  if not version or tonumber(stamp) > tonumber(version) then
    version = stamp
  end
end
record[#record + 1] = '_v'
record[#record + 1] = version
redis.call('ZREM', KEYS[4], id)
if done and tonumber(done) >= tonumber(version) then
  -- A completion as new or newer was made before (and waits or was delivered).
  redis.call('DEL', item)
  redis.call('HSET', item, unpack(record))
  redis.call('PEXPIRE', item, remember)
  return 0
end
redis.call('HSET', item, '_v', version)
redis.call('RENAME', item, outbox) -- replaces an older completion waiting there
redis.call('PERSIST', outbox)
redis.call('HSET', item, unpack(record))
redis.call('PEXPIRE', item, remember)
redis.call('ZADD', KEYS[3], lease, id)
return redis.call('HGETALL', outbox)
