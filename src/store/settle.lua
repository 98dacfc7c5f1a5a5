-- Settles a reservation once: each counter moves by (actual - reserved),
-- never below zero; concurrency slots are given back.
--
-- KEYS[1]   reservation hash
-- KEYS[2..] the reservation's counter keys, in its own order
-- ARGV: now, reservation id, then the actual amount for each counter
-- Returns 'settled', 'already_settled' or 'unknown'.

local now = tonumber(ARGV[1])
local rid = ARGV[2]
local r = redis.call('HMGET', KEYS[1], 's', 'x', 'o')
if not r[1] or tonumber(r[2]) <= now then return 'unknown' end
if r[1] == '1' then return 'already_settled' end

local i = 1
for line in string.gmatch(r[3], '[^\n]+') do
  local unit, amount, gauge, key = string.match(line, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  if key ~= KEYS[i + 1] then
    return redis.error_reply('settle keys do not match the reservation')
  end
  if gauge == '1' then
    redis.call('ZREM', key, rid)
  else
    local v = redis.call('HMGET', key, 'v', 'e')
    local used, e = tonumber(v[1]), tonumber(v[2])
    if used ~= nil and (e == 0 or e > now) then
      local delta = tonumber(ARGV[i + 2]) - tonumber(amount)
      if used + delta < 0 then delta = -used end
      redis.call('HINCRBY', key, 'v', string.format('%d', delta))
    end
  end
  i = i + 1
end
redis.call('HSET', KEYS[1], 's', '1')
return 'settled'
