-- Moves counters by a delta each, never below zero: used to undo a partial
-- reservation across cluster slots, and to settle one.
-- KEYS: counter keys (one slot). ARGV: now, reservation id, then per key:
-- kind (p plain, r rolling, g gauge) and delta. Gauges release the slot.
local now = tonumber(ARGV[1])
local rid = ARGV[2]
for i, key in ipairs(KEYS) do
  local kind = ARGV[1 + 2 * i]
  local delta = tonumber(ARGV[2 + 2 * i])
  if kind == 'g' then
    redis.call('ZREM', key, rid)
  elseif kind == 'r' then
    local v = redis.call('HMGET', key, 'v', 'e')
    local used = tonumber(v[1])
    if used ~= nil and tonumber(v[2]) > now then
      if used + delta < 0 then delta = -used end
      redis.call('HINCRBY', key, 'v', string.format('%d', delta))
    end
  else
    local used = tonumber(redis.call('GET', key))
    if used ~= nil then
      if used + delta < 0 then delta = -used end
      redis.call('INCRBY', key, string.format('%d', delta))
    end
  end
end
return 'ok'
