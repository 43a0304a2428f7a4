-- Removes outbox entries once the sink has settled them: an entry goes when the settled
-- version is at least its own (a newer indexed version supersedes it too); a newer
-- completion of the same id stays until it is settled. One call settles many entries: on
-- a cluster those of one bucket, on a single node any.
--
-- KEYS[2i - 1], KEYS[2i]  the outbox index and the outbox hash of item i
-- ARGV[2i - 1], ARGV[2i]  its id and version
-- Returns how many entries were removed.
local removed = 0
for i = 1, #KEYS / 2 do
  local index, key, id, version = KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 * i - 1], ARGV[2 * i]
  local queued = redis.call('HGET', key, '_v')
  if queued and tonumber(queued) <= tonumber(version) then
    redis.call('DEL', key)
    redis.call('ZREM', index, id)
    removed = removed + 1
  elseif not queued then
    redis.call('ZREM', index, id)
  end
end
return removed
