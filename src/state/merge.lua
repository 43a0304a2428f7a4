-- embedjoin's atomic merge of one item's parts (Redis runs a script alone, so exactly one
-- caller, from any instance, sees an item become complete).
--
-- KEYS[1]  the item's hash
-- ARGV[1]  TTL of an incomplete item, in milliseconds
-- ARGV[2]  n, the number of required part fields
-- ARGV[3 .. 2+n]        the required part fields
-- ARGV[3+n ..]          field, value pairs to write (parts as f32 little-endian bytes,
--                       `meta:<part>` as JSON)
--
-- Returns nil while the item is incomplete (its TTL refreshed), or, once every required
-- field is present, the whole hash as a flat field/value array, deleting the key.
local n = tonumber(ARGV[2])
if #ARGV > 2 + n then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3 + n))
end
local present = redis.call('HMGET', KEYS[1], unpack(ARGV, 3, 2 + n))
for i = 1, n do
  if not present[i] then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    return false
  end
end
local item = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return item
