-- The compact record of a completed item (see records.rs): the field `id` of a shared
-- hash per bucket and generation, packed as '<B' .. 'I7' x (n + 1): the fingerprint of
-- the configured part types, the completion's version, each part's stamp in order.
-- Prepended to the scripts that read or write records.

-- Returns the record of `id` (version, stamps by slot, the key it was found in) from the
-- hashes `keys` (previous, current, next generation), or nil.
local function read_record(keys, id, fingerprint, n)
  for _, key in ipairs({keys[2], keys[1], keys[3]}) do
    local packed = redis.call('HGET', key, id)
    if packed then
      if #packed ~= 1 + 7 * (n + 1) then
        return nil -- written for other parts: not ours
      end
      local values = {struct.unpack('<B' .. string.rep('I7', n + 1), packed)}
      if values[1] ~= tonumber(fingerprint) then
        return nil
      end
      local stamps = {}
      for j = 1, n do
        stamps[j] = values[2 + j]
      end
      return values[2], stamps, key
    end
  end
  return nil
end

-- Writes the record of `id` into the current generation's hash (and out of the one it was
-- found in), which expires at `expire_at` (unix ms).
local function write_record(keys, found_in, id, fingerprint, expire_at, version, stamps)
  local args = {'<B' .. string.rep('I7', #stamps + 1), tonumber(fingerprint), tonumber(version)}
  for j = 1, #stamps do
    args[#args + 1] = tonumber(stamps[j]) or 0
  end
  redis.call('HSET', keys[2], id, struct.pack(unpack(args)))
  redis.call('PEXPIREAT', keys[2], expire_at)
  if found_in and found_in ~= keys[2] then
    redis.call('HDEL', found_in, id)
  end
end
