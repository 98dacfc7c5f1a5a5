-- Moves one counter by `delta`, never below zero, if it is still live;
-- for a gauge, gives back the reservation's slot. Shared by settle.lua and
-- adjust.lua (prepended to each when loaded).
local function move_counter(kind, key, delta, now, rid)
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

