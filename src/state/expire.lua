-- Takes an orphan: a partial item not updated since a deadline. Returns its fields and
-- removes it, or nil if it was updated since (or is gone).
--
-- KEYS[1]  the item's hash             KEYS[2]  the partial index
-- ARGV[1]  the item id                 ARGV[2]  the deadline, in ms
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then
  return false
end
redis.call('ZREM', KEYS[2], ARGV[1])
local item = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return item
