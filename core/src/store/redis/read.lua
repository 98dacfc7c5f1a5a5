-- Reads counters for a usage report, whatever their representation.
-- KEYS: counter keys. ARGV[1]: now.
-- Returns a flat list: value, resets_at (-1 when unknown) per key.
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key).ok
  local used, reset = 0, -1
  if t == 'string' then
    used = tonumber(redis.call('GET', key))
  elseif t == 'hash' then
    local v = redis.call('HMGET', key, 'v', 'e')
    if tonumber(v[2]) > now then used, reset = tonumber(v[1]), tonumber(v[2]) end
  elseif t == 'zset' then
    used = redis.call('ZCOUNT', key, '(' .. string.format('%d', now), '+inf')
  end
  out[#out + 1] = string.format('%d', used)
  out[#out + 1] = string.format('%d', reset)
end
return out
