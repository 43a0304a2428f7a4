-- A maintenance lease on a range of buckets (see share.rs): held by one instance at a
-- time, renewed every round, lapsing if its instance stops renewing it (it died).
--
-- KEYS[1]  the range's lease key
-- ARGV[1]  the instance             ARGV[2]  the lease's length, ms
-- ARGV[3]  'renew' (only if held by the instance), 'take' (also if nobody holds it), or
--          'release' (if held by the instance)
-- Returns 1 when the instance holds the lease after the call, else 0.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  if ARGV[3] == 'release' then
    redis.call('DEL', KEYS[1])
    return 0
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder and ARGV[3] == 'take' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
