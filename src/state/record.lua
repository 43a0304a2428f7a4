-- The compact record of a completed item (see records.rs): the field `id` of its bucket's
-- hash, packed as '<B' .. 'I7' x (n + 2): the fingerprint of the configured part types,
-- when it was written (unix ms), the completion's version, each part's stamp in order.
-- Prepended to the scripts that read or write records.

-- Returns the record of `id` in the hash `key` (its version and stamps by slot), or nil
-- when there is none for these parts written within `remember` ms of `now`.
local function read_record(key, id, fingerprint, n, now, remember)
  local packed = redis.call('HGET', key, id)
  if not packed or #packed ~= 1 + 7 * (n + 2) then
    return nil
  end
  local values = {struct.unpack('<B' .. string.rep('I7', n + 2), packed)}
  if values[1] ~= tonumber(fingerprint) or values[2] + tonumber(remember) <= tonumber(now) then
    return nil
  end
  local stamps = {}
  for j = 1, n do
    stamps[j] = values[3 + j]
  end
  return values[3], stamps
end

-- Writes the record of `id` into the hash `key`, written `now`.
local function write_record(key, id, fingerprint, now, version, stamps)
  local args = {'<B' .. string.rep('I7', #stamps + 2), tonumber(fingerprint), tonumber(now), tonumber(version)}
  for j = 1, #stamps do
    args[#args + 1] = tonumber(stamps[j]) or 0
  end
  redis.call('HSET', key, id, struct.pack(unpack(args)))
end
