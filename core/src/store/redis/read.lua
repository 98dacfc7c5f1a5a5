-- Reads counters for a usage report, whatever their representation, with
-- what leases hold of them apart.
-- KEYS: counter keys. ARGV: now, the reading replica ('' = none; '-' reads
-- as a decision does, leases counted as used), then per key what that
-- replica holds unused in its lease (it knows exactly; its own entry in
-- the lease hash is as of its last refill).
-- Returns a flat list per key: usage (the value less every live lease),
-- resets_at (-1 when unknown), and the live leases.
local now = tonumber(ARGV[1])
local replica = ARGV[2]
local out = {}
for i, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key).ok
  local used, reset, leased = 0, -1, 0
  if t == 'string' and replica == '-' then
    used = tonumber(redis.call('GET', key))
  elseif t == 'string' then
    used = tonumber(redis.call('GET', key))
    local brace = string.find(key, '{', 1, true)
    local fields = redis.call('HGETALL', string.sub(key, 1, brace - 3) .. 'l:' .. string.sub(key, brace))
    for f = 1, #fields, 2 do
      if fields[f] ~= replica then
        local sep = string.find(fields[f + 1], ' ', 1, true)
        if tonumber(string.sub(fields[f + 1], sep + 1)) > now then
          leased = leased + tonumber(string.sub(fields[f + 1], 1, sep - 1))
        end
      end
    end
    leased = math.min(leased + tonumber(ARGV[2 + i] or '0'), used)
    used = used - leased
  elseif t == 'hash' then
    local v = redis.call('HMGET', key, 'v', 'e')
    if tonumber(v[2]) > now then used, reset = tonumber(v[1]), tonumber(v[2]) end
  elseif t == 'zset' then
    used = redis.call('ZCOUNT', key, '(' .. string.format('%d', now), '+inf')
  end
  out[#out + 1] = string.format('%d', used)
  out[#out + 1] = string.format('%d', reset)
  out[#out + 1] = string.format('%d', leased)
end
return out
