-- Removes a completed item from the outbox once the sink has taken it, unless a newer
-- completion of the same id has replaced it since (then that one stays until confirmed).
--
-- KEYS[1]  the item's outbox hash      KEYS[2]  the outbox index
-- ARGV[1]  the item id                 ARGV[2]  the completion token that was delivered
if redis.call('HGET', KEYS[1], '_done') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
