-- Removes records older than remember_completed from one bucket's hash (see records.rs):
-- Redis 7.0 has no expiry per hash field, so maintenance sweeps the buckets in turn.
--
-- KEYS[1]  a bucket's record hash   ARGV[1]  now, ms   ARGV[2]  remember_completed, ms
-- Returns how many records were removed.
local all = redis.call('HGETALL', KEYS[1])
local old, removed = {}, 0
for i = 1, #all, 2 do
  local value = all[i + 1]
  -- An unreadable value goes too: records are rewritten in full when written again.
  if #value < 8 or struct.unpack('<I7', value, 2) + tonumber(ARGV[2]) <= tonumber(ARGV[1]) then
    old[#old + 1] = all[i]
  end
  if #old == 1000 or (i + 1 == #all and #old > 0) then
    redis.call('HDEL', KEYS[1], unpack(old))
    removed = removed + #old
    old = {}
  end
end
return removed
