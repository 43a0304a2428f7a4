-- embedjoin's atomic merge of one item's parts. Redis runs a script alone, so exactly one
-- caller, from any instance, sees an item become complete.
--
-- KEYS[1]  the item's hash (partial parts)
-- KEYS[2]  the item's outbox hash (complete, not yet confirmed by the sink)
-- KEYS[3]  the outbox index: sorted set of ids by completion time (ms)
-- KEYS[4]  the partial index: sorted set of ids by last update (ms), for the orphan sweeper
-- ARGV[1]  the item id            ARGV[2]  now, in ms
-- ARGV[3]  backstop TTL of an incomplete item, in ms (the sweeper normally acts first)
-- ARGV[4]  completion token: marks this completion in the outbox, so that only its own
--          confirmation removes it
-- ARGV[5]  n, the number of required part fields; ARGV[6 .. 5+n] those fields
-- ARGV[6+n ..]  field, value pairs to write (parts as f32 little-endian bytes, `meta:<part>`
--          as JSON)
--
-- Returns nil while the item is incomplete, or, once every required field is present, the
-- whole item as a flat field/value array, after moving it to the outbox.
local id, now, ttl, token, n = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if #ARGV >= 6 + n then
  redis.call('HSET', KEYS[1], unpack(ARGV, 6 + n))
end
local present = redis.call('HMGET', KEYS[1], unpack(ARGV, 6, 5 + n))
for i = 1, n do
  if not present[i] then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('ZADD', KEYS[4], now, id)
    return false
  end
end
redis.call('HSET', KEYS[1], '_done', token)
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], now, id)
redis.call('ZREM', KEYS[4], id)
return redis.call('HGETALL', KEYS[2])
