-- Removes completed items from the outbox once the sink has taken them, unless a newer
-- completion of the same id has replaced one since (then that one stays until confirmed).
-- One call confirms a whole bulk response.
--
-- KEYS[1]      the outbox index
-- KEYS[1 + i]  the outbox hash of item i      ARGV[2i - 1], ARGV[2i]  its id and token
-- Returns how many entries were removed.
local removed = 0
for i = 1, #KEYS - 1 do
  local key, id, token = KEYS[1 + i], ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HGET', key, '_done') == token then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
    removed = removed + 1
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEYS[1], id)
  end
end
return removed
