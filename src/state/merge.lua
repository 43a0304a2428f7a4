-- embedjoin's atomic merge of one item's parts. Redis runs a script alone, so exactly one
-- caller, from any instance, sees an item become complete. (record.lua comes first.)
--
-- The item's hash holds, per part type T whose copy waits for the others: `T` (the
-- vector, f32 little-endian), `s:T` (its stamp) and `m:T` (its metadata JSON). Once the
-- item completes, the hash moves to the outbox and the item is remembered by its record:
-- the completion's version and each part's stamp (record.lua).
--
-- KEYS[1]  the item's hash          KEYS[2]  the item's outbox hash
-- KEYS[3]  the outbox index (ids by lease expiry, ms)
-- KEYS[4]  the partial index (ids by last update, ms)
-- KEYS[5]  the record hash of the item's bucket
-- ARGV[1]  the item id              ARGV[2]  now, ms
-- ARGV[3]  TTL of an incomplete item, ms (a backstop: the orphan sweep acts first)
-- ARGV[4]  how long a completed item is remembered, ms
-- ARGV[5]  the lease of a new outbox entry: until then, only this caller sends it
-- ARGV[6]  '1' when a newer copy for a completed item updates its document (late_parts)
-- ARGV[7]  the record fingerprint   ARGV[8]  n, the number of part types
-- ARGV[9 .. 8+n] the types; ARGV[9+n ..] per part to write: type, stamp, vector, metadata
--          ('' for none)
--
-- A copy no newer than the one known (waiting here, or in the record) is skipped:
-- re-applying a merge whose reply was lost changes nothing, and an old copy never replaces
-- a newer one or revives a completed one. Returns 0 when nothing became complete, else the
-- completed item (flat field/value array, with `_v` its version, but for the vectors and
-- metadata this call wrote: their stamps say which) after moving it to the outbox. With updates on, newer copies for a remembered item go to its outbox entry
-- instead (made with `_update` = 1 if there is none; a completion waiting there takes them
-- in), leased to the caller, and the entry is returned as for a completion.
local item, outbox = KEYS[1], KEYS[2]
local records = KEYS[5]
local wrote = {}
-- The outbox entry as the reply: every field but the vectors and metadata this call wrote
-- (the caller has them): their stamps say which they are.
local function entry_reply()
  local fields = {'_v', '_update', '_orphan'}
  for i = 9, 8 + tonumber(ARGV[8]) do
    local t = ARGV[i]
    fields[#fields + 1] = 's:' .. t
    if not wrote[t] then
      fields[#fields + 1] = t
      fields[#fields + 1] = 'm:' .. t
    end
  end
  local values = redis.call('HMGET', outbox, unpack(fields))
  local reply = {}
  for i = 1, #fields do
    if values[i] then
      reply[#reply + 1] = fields[i]
      reply[#reply + 1] = values[i]
    end
  end
  return reply
end
local id, now, ttl, remember, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local update, fingerprint, n = ARGV[6] == '1', ARGV[7], tonumber(ARGV[8])
local first = 9 + n
-- The stamps of the copies waiting here, and the record: what is known of each part.
local asked, slot = {}, {}
for i = 9, 8 + n do
  asked[#asked + 1] = 's:' .. ARGV[i]
  slot[ARGV[i]] = #asked
end
local waiting = redis.call('HMGET', item, unpack(asked))
local done, recorded = read_record(records, id, fingerprint, n, now, remember)
local known = {}
for j = 1, n do
  local w, r = tonumber(waiting[j]), recorded and recorded[j]
  if r and r > 0 and (not w or r > w) then
    w = r
  end
  known[j] = w
end
local set, del = {}, {}
for i = first, #ARGV, 4 do
  local t, stamp = ARGV[i], tonumber(ARGV[i + 1])
  local j = slot[t]
  if not known[j] or known[j] < stamp then
    set[#set + 1] = t
    set[#set + 1] = ARGV[i + 2]
    set[#set + 1] = 's:' .. t
    set[#set + 1] = ARGV[i + 1]
    if ARGV[i + 3] ~= '' then
      set[#set + 1] = 'm:' .. t
      set[#set + 1] = ARGV[i + 3]
    else
      del[#del + 1] = 'm:' .. t -- an older copy's metadata goes with it
    end
    wrote[t] = true
    known[j] = stamp
  end
end
if #set == 0 then
  return 0
end
if update and done then
  -- The item's document is indexed (or on its way): these copies update it.
  local version = tonumber(redis.call('HGET', outbox, '_v') or '0')
  for t in pairs(wrote) do
    version = math.max(version, known[slot[t]])
  end
  if redis.call('EXISTS', outbox) == 0 then
    redis.call('HSET', outbox, '_update', '1')
  end
  redis.call('HSET', outbox, '_v', string.format('%d', version), unpack(set))
  if #del > 0 then
    redis.call('HDEL', outbox, unpack(del))
  end
  write_record(records, id, fingerprint, now, done, known)
  redis.call('ZADD', KEYS[3], lease, id)
  return entry_reply()
end
-- Every part is here if each one was written now or waits here: a waiting part always has
-- its stamp (every script writes and removes `T` and `s:T` together), so the stamps read
-- above tell, and no vector is looked at.
local waited = false
for j = 1, n do
  if waiting[j] then
    waited = true
  elseif not wrote[ARGV[8 + j]] then
    redis.call('HSET', item, unpack(set))
    if #del > 0 then
      redis.call('HDEL', item, unpack(del))
    end
    redis.call('PEXPIRE', item, ttl)
    redis.call('ZADD', KEYS[4], now, id)
    return 0
  end
end
-- Complete: the hash moves to the outbox as it is (RENAME: no vector is copied), and the
-- record remembers the parts' stamps and the version.
local version = 0
for j = 1, n do
  version = math.max(version, known[j])
end
if waited then
  redis.call('ZREM', KEYS[4], id)
end
if done and done >= version then
  -- A completion as new or newer was made before (and waits or was delivered).
  redis.call('DEL', item)
  write_record(records, id, fingerprint, now, done, known)
  return 0
end
redis.call('HSET', item, '_v', string.format('%d', version), unpack(set))
if #del > 0 then
  redis.call('HDEL', item, unpack(del))
end
redis.call('RENAME', item, outbox) -- replaces an older completion waiting there
redis.call('PERSIST', outbox)
redis.call('ZADD', KEYS[3], lease, id)
write_record(records, id, fingerprint, now, version, known)
return entry_reply()
